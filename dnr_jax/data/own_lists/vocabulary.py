"""The vocabulary of own lists: raw ids (users, items, feature values) to dense ids.

Fitted on the files a data set is prepared from (``fit_vocabulary``) and saved beside
it (``vocab.json``), so that inference maps new lists the way the model was trained.

Two ways bound the user and item tables (``OwnListsConfig``): ``min_id_count`` keeps
only the ids seen at least that often (the rest share the unknown row 0), and
``id_buckets`` hashes ids into a fixed number of rows (``hash_rows``). Both are saved
in ``vocab.json``, so reranking and serving map ids exactly as training did.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from absl import logging

from dnr_jax.data.own_lists import sources
from dnr_jax.data.own_lists.format import (FORMAT_VERSION, VOCAB_FILE, OwnListsConfig,
                                           check_path, feature_columns)
from dnr_jax.errors import DataError


def _to_arrow(raw) -> pa.Array:
  if isinstance(raw, pa.ChunkedArray):
    return raw.combine_chunks()
  if isinstance(raw, pa.Array):
    return raw
  values = np.asarray(raw, dtype=object) if not isinstance(raw, np.ndarray) else raw
  if values.dtype == object:
    values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else
              (v if isinstance(v, str) else str(v)) for v in values.reshape(-1)]
  return pa.array(values)


# The columns whose tables ``min_id_count`` and ``id_buckets`` bound.
BOUNDED = ("user", "item")


def hash_rows(values: Sequence[str], buckets: int) -> np.ndarray:
  """Rows ``1..buckets`` of raw ids (text): BLAKE2b's first 8 bytes modulo
  ``buckets``, the same in every process and on every machine (Python's ``hash`` is
  salted per process)."""
  out = np.fromiter(
      (int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
       % buckets for v in values), np.int64, count=len(values))
  return (out + 1).astype(np.int32)


class Vocabulary:
  """Raw ids (as text) to dense ids ``1..V-1`` per column; ``0`` = padding / unknown.

  Columns: ``"user"``, ``"item"`` and each feature column by name (``u_*``, ``i_*``).
  Ids are assigned in sorted text order, so a vocabulary depends on the set of ids
  only, not on the order of the file. With ``buckets`` the user and item columns keep
  no ids: an id's row is ``hash_rows`` of it, and no id is unknown.

  Attributes:
    min_count / buckets: the bounds it was fitted with (``OwnListsConfig``'s
      ``min_id_count`` / ``id_buckets``).
    stats: per bounded column, what fitting saw: ``seen`` distinct ids, ``rows`` the
      table's rows, ``dropped`` ids below ``min_count`` (sharing row 0),
      ``shared_rows`` / ``ids_in_shared_rows`` rows holding several hashed ids.
  """

  def __init__(self, columns: Mapping[str, Sequence[str]],
               user_features: Sequence[str] = (), item_features: Sequence[str] = (),
               *, min_count: int = 1, buckets: int = 0,
               stats: Mapping[str, Any] | None = None):
    self.columns = {k: list(v) for k, v in columns.items()}
    self.user_features = tuple(user_features)
    self.item_features = tuple(item_features)
    self.min_count, self.buckets = int(min_count), int(buckets)
    self.stats = dict(stats or {})
    for c in ("user", "item") + self.user_features + self.item_features:
      self.columns.setdefault(c, [])
    self._index: dict[str, dict[str, int]] = {}
    self._arrays: dict[str, pa.Array] = {}
    self._shared: dict[str, np.ndarray] = {}

  @classmethod
  def fit(cls, values: Mapping[str, Iterable[Any]], user_features: Sequence[str] = (),
          item_features: Sequence[str] = (), *, min_count: int = 1,
          buckets: int = 0) -> "Vocabulary":
    """The vocabulary of the values seen: ``values[column]`` yields arrays of raw ids
    (anything ``pyarrow.array`` takes, chunk by chunk; every occurrence, so that
    ``min_count`` can count them); nulls and empty strings are not ids."""
    out, stats, shared = {}, {}, {}
    for column, chunks in values.items():
      bounded = column in BOUNDED
      counts: dict[str, int] = {}
      seen: set[str] = set()
      for chunk in chunks:
        arr = sources.text(_to_arrow(chunk))
        if bounded and min_count > 1:
          vc = pc.value_counts(arr)
          for v, c in zip(vc.field("values").to_pylist(),
                          vc.field("counts").to_pylist()):
            if v:
              counts[v] = counts.get(v, 0) + c
        else:
          seen.update(v for v in pc.unique(arr).to_pylist() if v)
      if counts:
        seen = set(counts)
      if bounded and buckets:
        rows = np.bincount(hash_rows(list(seen), buckets), minlength=buckets + 1)
        shared[column] = rows > 1
        out[column] = []
        stats[column] = {"seen": len(seen), "rows": buckets + 1,
                         "shared_rows": int((rows > 1).sum()),
                         "ids_in_shared_rows": int(rows[rows > 1].sum())}
      elif bounded:
        kept = sorted(v for v in seen if counts.get(v, min_count) >= min_count)
        out[column] = kept
        stats[column] = {"seen": len(seen), "rows": len(kept) + 1,
                         "dropped": len(seen) - len(kept)}
      else:
        out[column] = sorted(seen)
    vocab = cls(out, user_features, item_features, min_count=min_count,
                buckets=buckets, stats=stats)
    vocab._shared.update(shared)
    return vocab

  def size(self, column: str) -> int:
    """Vocabulary size including the padding id 0 (what the models' tables need)."""
    if self.buckets and column in BOUNDED:
      return self.buckets + 1
    return len(self.columns[column]) + 1

  def shared_rows(self, column: str) -> np.ndarray | None:
    """``[size]`` bools: the rows that hold several ids seen when fitting (hashed
    columns of a fitted vocabulary), else ``None``."""
    return self._shared.get(column)

  @property
  def num_users(self) -> int:
    return self.size("user")

  @property
  def num_items(self) -> int:
    return self.size("item")

  @property
  def user_feature_vocab(self) -> tuple[int, ...]:
    return tuple(self.size(c) for c in self.user_features)

  @property
  def item_feature_vocab(self) -> tuple[int, ...]:
    return tuple(self.size(c) for c in self.item_features)

  def lookup(self, column: str, raw) -> tuple[np.ndarray, int]:
    """``(ids, n_unknown)``: int32 ids of raw values (any array-like); unknown values
    map to 0 and are counted; missing values (null, "") map to 0 uncounted."""
    if column not in self.columns:
      raise KeyError(f"no vocabulary column {column!r}; have {sorted(self.columns)}")
    arr = sources.text(_to_arrow(raw))
    if len(arr) == 0:
      return np.zeros((0,), np.int32), 0
    if self.buckets and column in BOUNDED:
      # Hashed: every id has a row, none is unknown; missing values are row 0.
      enc = pc.dictionary_encode(arr)
      uniq = enc.dictionary.to_pylist()
      rows = np.append(np.where([bool(v) for v in uniq],
                                hash_rows([v or "" for v in uniq], self.buckets), 0),
                       0).astype(np.int32)
      codes = enc.indices.fill_null(len(rows) - 1).to_numpy(zero_copy_only=False)
      return rows[codes], 0
    values = self.columns[column]
    if len(values) <= 4 * len(arr):
      # Vectorised: pyarrow hashes the vocabulary per call, cheap while it is not
      # much larger than the batch; a large catalogue goes through the dict below.
      if column not in self._arrays:
        self._arrays[column] = pa.array(values, pa.string())
      pos = pc.index_in(arr, value_set=self._arrays[column])
      ids = pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32) + 1
      present = pc.and_(pc.is_valid(arr), pc.not_equal(arr, "")).fill_null(False)
      return ids, int(((ids == 0) & present.to_numpy(zero_copy_only=False)).sum())
    index = self._index.get(column)
    if index is None:
      index = self._index[column] = {v: i + 1 for i, v in enumerate(values)}
    enc = pc.dictionary_encode(arr)
    table = np.array([index.get(v, 0) for v in enc.dictionary.to_pylist()] + [0],
                     np.int32)
    missing = np.array([not v for v in enc.dictionary.to_pylist()] + [True])
    codes = enc.indices.fill_null(len(table) - 1).to_numpy(zero_copy_only=False)
    ids = table[codes]
    return ids, int(((ids == 0) & ~missing[codes]).sum())

  def lookup_texts(self, column: str, values: Sequence[str]) -> np.ndarray:
    """Int32 ids of a few non-empty texts (an online request's ids), ``lookup``'s ids
    for them; an unknown text is 0.

    ``lookup`` hands every call to pyarrow, whose fixed cost per call outweighs the
    work for a request's twenty ids (its vectorised path also re-hashes the
    vocabulary each call); a Python dict, built once per column, does not.
    """
    if column not in self.columns:
      raise KeyError(f"no vocabulary column {column!r}; have {sorted(self.columns)}")
    if self.buckets and column in BOUNDED:
      return hash_rows(values, self.buckets)
    index = self._index.get(column)
    if index is None:
      index = self._index[column] = {v: i + 1 for i, v in enumerate(self.columns[column])}
    return np.fromiter(map(index.get, values, itertools.repeat(0)), np.int32,
                       count=len(values))

  def lookup_users(self, raw) -> tuple[np.ndarray, int]:
    return self.lookup("user", raw)

  def lookup_items(self, raw) -> tuple[np.ndarray, int]:
    return self.lookup("item", raw)

  def save(self, directory: str) -> str:
    """Writes ``<directory>/vocab.json`` (atomically); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, VOCAB_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"format_version": FORMAT_VERSION, "user_features":
                 list(self.user_features), "item_features": list(self.item_features),
                 "min_count": self.min_count, "buckets": self.buckets,
                 "stats": self.stats, "columns": self.columns}, f)
    os.replace(path + ".tmp", path)
    return path

  @classmethod
  def load(cls, directory: str) -> "Vocabulary":
    path = os.path.join(directory, VOCAB_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
      return cls(d["columns"], d["user_features"], d["item_features"],
                 min_count=d.get("min_count", 1), buckets=d.get("buckets", 0),
                 stats=d.get("stats"))
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f"{path}: cannot read the vocabulary ({e})") from e

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and (
        self.columns, self.user_features, self.item_features, self.min_count,
        self.buckets) == (other.columns, other.user_features, other.item_features,
                          other.min_count, other.buckets)


def fit_vocabulary(config: OwnListsConfig) -> Vocabulary:
  """The vocabulary of ``config``'s files: users, items (candidates, histories,
  interactions) and feature values (one streamed pass per file)."""
  path = check_path(config.lists, "lists")
  names = sources.header(path)
  ufeat, ifeat = feature_columns(names, config)
  wanted = ["user_id", "item_id", "history", *ufeat, *ifeat]
  src = sources.Source(path, wanted, config.chunk_rows)
  for c in ("user_id", "item_id"):
    if c not in names:
      raise DataError(f"{path}: missing column {c!r}; the header has {names}")
  values: dict[str, list[pa.Array]] = {c: [] for c in ("user", "item", *ufeat, *ifeat)}
  counting = config.min_id_count > 1

  def occurrences(col):
    # Every occurrence when ids are counted (min_id_count), else the chunk's set.
    text = sources.text(col)
    return text if counting else pc.unique(text)

  t0, last, rows = time.time(), time.time(), 0
  total_rows = sources.row_count(path)
  for table in src.batches():
    rows += table.num_rows
    if time.time() - last > 5:
      last = time.time()
      share = f", {100 * rows / total_rows:.0f}% of the file" if total_rows else ""
      logging.info("vocabulary: %d rows of %s read so far (%.0f rows/s%s)", rows, path,
                   rows / (last - t0), share)
    values["user"].append(occurrences(table.column("user_id")))
    values["item"].append(occurrences(table.column("item_id")))
    if "history" in table.column_names and config.interactions is None:
      try:
        hist = sources.history_values(table.column("history").combine_chunks(),
                                      config.history_separator)
      except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{src.where(0, 'history')}: not a list of ids ({e})") from e
      values["item"].append(occurrences(pc.list_flatten(hist)))
    for c in ufeat + ifeat:
      values[c].append(pc.unique(sources.text(table.column(c))))
  if config.interactions:
    isrc = sources.Source(check_path(config.interactions, "interactions"),
                          ("user_id", "item_id"), config.chunk_rows)
    for table in isrc.batches():
      values["user"].append(occurrences(table.column("user_id")))
      values["item"].append(occurrences(table.column("item_id")))
  return Vocabulary.fit(values, ufeat, ifeat, min_count=config.min_id_count,
                        buckets=config.id_buckets)
