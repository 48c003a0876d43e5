"""Your own lists: the format for lists that your own retriever served, and its reader.

FORMAT SPECIFICATION, version ``FORMAT_VERSION`` (1.0)
=====================================================

**Lists file** (Parquet: ``.parquet`` / ``.pq``; CSV with a header line: ``.csv``, for
small cases). One row per candidate of a served list:

============  ========  ===============================================================
column        required  meaning
============  ========  ===============================================================
``list_id``   yes       the list (one request); any type (int, string, ...)
``user_id``   yes       who the list was served to; any type; one user per list
``item_id``   yes       the candidate; any type; an item appears once per list
``score``     yes       the upstream (retriever) score, finite; in [0, 1] unless
                        ``OwnListsConfig.score_transform="sigmoid"`` (logits)
``label``     training  the feedback, 0 or 1 (bool, int or 0.0 / 1.0); absent at
                        inference
``position``  no        the order the upstream served (any numbers, smaller first,
                        unique within a list); default order: by ``score``
                        descending, ties in file order
``time``      no        when the list was served (a number or a timestamp; the same
                        within a list, and the same unit as the interactions' time)
``split``     no        ``train`` / ``valid`` / ``test`` (the same within a list)
``history``   no        the user's previous items before this list, most recent last:
                        a list-valued column (Parquet) or ids joined by ``|`` (CSV,
                        ``history_separator``); read from the list's first row
``u_*``       no        categorical user features (any type; the same within a
                        list); empty = unknown
``i_*``       no        categorical item features (any type, per row); empty = unknown
============  ========  ===============================================================

Other columns are ignored. **A list's rows must be contiguous** in the file (rows of
one ``list_id`` next to each other, in any order): the reader streams the file in
bounded memory and a list id that reappears after another list is an error.

**Interactions file** (optional; Parquet or CSV): ``user_id``, ``item_id``, ``time``,
optional ``label`` (0/1). When given, a list's history is the user's last ``H``
interactions (``label == 1`` ones only when the file has a ``label`` column) with
``time`` strictly before the list's ``time`` (so the lists need a ``time`` column),
most recent last; ties in time keep file order. It replaces a ``history`` column.
With neither, every history is empty (the models then see no history).

**Ids.** Raw ids (users, items, feature values) are compared as text (an int id ``5``
and the string ``"5"`` are the same id) and map through a ``Vocabulary`` fitted on the
prepared data and saved beside it (``vocab.json``): ids ``1..V-1``, ``0`` = padding /
unknown (the ``dnr_jax.batch`` convention). At inference, unknown users, items,
history items and feature values map to 0 and are *counted* (``ReadStats.unknown``),
never an error. Unknown history items are dropped from the history.

**Lists to arrays.** Candidates are put in upstream order (``position``, else score
descending); lists longer than ``n`` (``list_size``) keep their first ``n`` and are
counted (``truncated_lists``), shorter ones are padded (``mask == False``).

**Splits** (``OwnListsConfig.split``): the ``split`` column when present; else by
``time``: the last ``test_fraction`` (10%) of the lists by time are test, the
``valid_fraction`` (10%) before them valid, as in the project's other protocols
(lists served at the same time as a cut's list go with it); without ``time`` either,
by file order, with a warning.

**Errors.** A bad file raises ``DataError`` with one line naming the file, the row (CSV:
``line`` as an editor shows it; Parquet: 1-based ``row``), the column and the problem:
a missing column or value, a label that is not 0/1, a non-finite or out-of-range
score, a duplicate ``(list_id, item_id)``, a list with several users (or several
times, splits, user features), a list id that reappears, an unknown split name.

Memory: the lists file is streamed in chunks of ``chunk_rows`` rows; an interactions
file is held in memory as 12 bytes per row (its user ids as a dictionary); the
reader remembers the ids of the lists it has seen, to catch non-contiguous lists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from absl import logging

from dnr_jax.batch import FIELDS
from dnr_jax.data.csv_reader import DataError
from dnr_jax.errors import ConfigError

FORMAT_VERSION = "1.0"
REQUIRED = ("list_id", "user_id", "item_id", "score")
INTERACTION_COLUMNS = ("user_id", "item_id", "time")
SPLITS = ("train", "valid", "test")
SCORE_TRANSFORMS = ("none", "sigmoid")
SPLIT_MODES = ("auto", "column", "time", "file_order")
VOCAB_FILE = "vocab.json"
RUN_FILE = "data_config.json"      # what a trained run records (``save_for_run``)


@dataclasses.dataclass(frozen=True)
class OwnListsConfig:
  """Where your lists are and how they become arrays (see the module doc: the format).

  Attributes:
    lists: the lists file (Parquet or CSV).
    interactions: an optional interactions file the histories come from.
    list_size: ``n``, candidates per list (longer lists are cut, shorter padded).
    history_size: ``H``, history items per list.
    user_prefix / item_prefix: columns with these prefixes are user / item features.
    score_transform: ``none`` (scores must be in [0, 1]) or ``sigmoid`` (logits).
    history_separator: separator of the ids in a CSV ``history`` column.
    split: ``auto`` (the ``split`` column, else ``time``, else file order), or one of
      ``column`` / ``time`` / ``file_order`` explicitly.
    valid_fraction / test_fraction: of the lists, by time (split by time).
    chunk_rows: rows read at once (the reader's memory bound).
    data_dir: where prepared data sets go (default ``raw.default_data_dir()``).
    name: a short description for logs and tables (default: the file's name).
  """
  lists: str | None = None
  interactions: str | None = None
  list_size: int = 50
  history_size: int = 50
  user_prefix: str = "u_"
  item_prefix: str = "i_"
  score_transform: str = "none"
  history_separator: str = "|"
  split: str = "auto"
  valid_fraction: float = 0.1
  test_fraction: float = 0.1
  chunk_rows: int = 1 << 16
  data_dir: str | None = None
  name: str = ""

  def validate(self) -> None:
    for field in ("list_size", "history_size", "chunk_rows"):
      if getattr(self, field) < 1:
        raise ConfigError(f"own_lists.{field}={getattr(self, field)} must be >= 1")
    if self.score_transform not in SCORE_TRANSFORMS:
      raise ConfigError(f"own_lists.score_transform={self.score_transform!r} is not one "
                        f"of {SCORE_TRANSFORMS}")
    if self.split not in SPLIT_MODES:
      raise ConfigError(f"own_lists.split={self.split!r} is not one of {SPLIT_MODES}")
    if not self.user_prefix or not self.item_prefix or \
        self.user_prefix == self.item_prefix:
      raise ConfigError(f"own_lists.user_prefix={self.user_prefix!r} and item_prefix="
                        f"{self.item_prefix!r} must be non-empty and differ")
    if self.valid_fraction <= 0 or self.test_fraction <= 0 or \
        self.valid_fraction + self.test_fraction >= 1:
      raise ConfigError(f"own_lists.valid_fraction={self.valid_fraction} and "
                        f"test_fraction={self.test_fraction} must be > 0 and sum < 1")
    if not self.history_separator:
      raise ConfigError("own_lists.history_separator must not be empty")


# -- reading files ----------------------------------------------------------------------

def _is_parquet(path: str) -> bool:
  return path.lower().endswith((".parquet", ".pq"))


def _check_path(path: str | None, what: str) -> str:
  if not path:
    raise DataError(f"no {what} file given")
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file (the {what} file)")
  if not _is_parquet(path) and not path.lower().endswith((".csv", ".csv.gz")):
    raise DataError(f"{path}: unknown file type; the {what} file must be Parquet "
                    "(.parquet, .pq) or CSV (.csv, .csv.gz)")
  return path


def header(path: str) -> list[str]:
  """The column names of a lists or interactions file."""
  if _is_parquet(path):
    try:
      return list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as e:
      raise DataError(f"{path}: not a readable Parquet file ({e})") from e
  try:
    reader = pa_csv.open_csv(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"{path}: line 1: not a readable CSV file ({e})") from e
  return list(reader.schema.names)


class _Source:
  """A lists or interactions file, read in batches of ``chunk_rows`` rows."""

  def __init__(self, path: str, columns: Sequence[str], chunk_rows: int):
    self.path = path
    self.parquet = _is_parquet(path)
    self.names = header(path)
    self.columns = [c for c in self.names if c in set(columns)]
    self.chunk_rows = chunk_rows

  def where(self, row: int, column: str | None = None) -> str:
    """``file: line L`` (CSV) or ``file: row R`` (Parquet) of a 0-based data row."""
    place = f"line {row + 2}" if not self.parquet else f"row {row + 1}"
    col = f", column {column!r}" if column else ""
    return f"{self.path}: {place}{col}"

  def batches(self) -> Iterator[pa.Table]:
    if self.parquet:
      f = pq.ParquetFile(self.path)
      for b in f.iter_batches(batch_size=self.chunk_rows, columns=self.columns):
        yield pa.Table.from_batches([b])
      return
    # Every CSV column is read as text and converted here, so that a bad value is
    # reported with its line (pyarrow's own conversion errors do not say where).
    reader = pa_csv.open_csv(
        self.path, read_options=pa_csv.ReadOptions(block_size=1 << 22),
        convert_options=pa_csv.ConvertOptions(
            column_types={c: pa.string() for c in self.names},
            include_columns=self.columns, strings_can_be_null=True,
            null_values=[""], quoted_strings_can_be_null=False))
    pending: list[pa.RecordBatch] = []
    rows = 0
    try:
      for b in reader:
        pending.append(b)
        rows += b.num_rows
        if rows >= self.chunk_rows:
          yield pa.Table.from_batches(pending)
          pending, rows = [], 0
    except pa.ArrowInvalid as e:
      raise DataError(f"{self.path}: unreadable CSV ({e})") from e
    if pending:
      yield pa.Table.from_batches(pending)


def _text(col: pa.ChunkedArray | pa.Array) -> pa.Array:
  """Ids as text: ``5`` and ``"5"`` are the same id."""
  arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
  if pa.types.is_dictionary(arr.type):
    arr = arr.dictionary_decode()
  if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
    arr = pc.cast(arr, pa.string())
  return pc.cast(arr, pa.string())


def _first_null(arr: pa.Array) -> int | None:
  if arr.null_count == 0:
    return None
  return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def _numbers(src: _Source, table: pa.Table, column: str, row0: int) -> np.ndarray:
  """A numeric column as float64 (bools as 0/1); missing or unparsable: DataError."""
  arr = table.column(column).combine_chunks()
  bad = _first_null(arr)
  if bad is not None:
    raise DataError(f"{src.where(row0 + bad, column)}: missing value")
  if pa.types.is_boolean(arr.type):
    return arr.to_numpy(zero_copy_only=False).astype(np.float64)
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    try:
      return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      for i, v in enumerate(arr.to_pylist()):
        try:
          float(v)
        except ValueError:
          raise DataError(f"{src.where(row0 + i, column)}: cannot parse {v!r} as a "
                          "number") from None
      raise
  if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or \
      pa.types.is_decimal(arr.type):
    return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
  raise DataError(f"{src.where(row0, column)}: type {arr.type} is not a number")


def _times(src: _Source, table: pa.Table, row0: int) -> np.ndarray:
  """``time`` as float64: numbers as they are, timestamps / dates in seconds."""
  arr = table.column("time").combine_chunks()
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    try:
      return _numbers(src, table, "time", row0)
    except DataError:
      try:   # ISO 8601 text, e.g. 2024-05-01 12:00:00
        arr = pc.cast(arr, pa.timestamp("us"))
      except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{src.where(row0, 'time')}: not a number or an ISO 8601 "
                        "timestamp") from None
  if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
    bad = _first_null(arr)
    if bad is not None:
      raise DataError(f"{src.where(row0 + bad, 'time')}: missing value")
    us = pc.cast(pc.cast(arr, pa.timestamp("us")), pa.int64())
    return us.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6
  return _numbers(src, table, "time", row0)


# -- the vocabulary ---------------------------------------------------------------------

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


class Vocabulary:
  """Raw ids (as text) to dense ids ``1..V-1`` per column; ``0`` = padding / unknown.

  Columns: ``"user"``, ``"item"`` and each feature column by name (``u_*``, ``i_*``).
  Ids are assigned in sorted text order, so a vocabulary depends on the set of ids
  only, not on the order of the file.
  """

  def __init__(self, columns: Mapping[str, Sequence[str]],
               user_features: Sequence[str] = (), item_features: Sequence[str] = ()):
    self.columns = {k: list(v) for k, v in columns.items()}
    self.user_features = tuple(user_features)
    self.item_features = tuple(item_features)
    for c in ("user", "item") + self.user_features + self.item_features:
      self.columns.setdefault(c, [])
    self._index: dict[str, dict[str, int]] = {}
    self._arrays: dict[str, pa.Array] = {}

  @classmethod
  def fit(cls, values: Mapping[str, Iterable[Any]], user_features: Sequence[str] = (),
          item_features: Sequence[str] = ()) -> "Vocabulary":
    """The vocabulary of every value seen: ``values[column]`` yields arrays of raw ids
    (anything ``pyarrow.array`` takes, chunk by chunk); nulls and empty strings are
    not ids."""
    out = {}
    for column, chunks in values.items():
      seen: set[str] = set()
      for chunk in chunks:
        uniq = pc.unique(_text(_to_arrow(chunk))).to_pylist()
        seen.update(v for v in uniq if v)
      out[column] = sorted(seen)
    return cls(out, user_features, item_features)

  def size(self, column: str) -> int:
    """Vocabulary size including the padding id 0 (what the models' tables need)."""
    return len(self.columns[column]) + 1

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
    arr = _text(_to_arrow(raw))
    if len(arr) == 0:
      return np.zeros((0,), np.int32), 0
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

  def lookup_users(self, raw) -> tuple[np.ndarray, int]:
    return self.lookup("user", raw)

  def lookup_items(self, raw) -> tuple[np.ndarray, int]:
    return self.lookup("item", raw)

  def lookup_feature(self, column: str, raw) -> tuple[np.ndarray, int]:
    return self.lookup(column, raw)

  def save(self, directory: str) -> str:
    """Writes ``<directory>/vocab.json`` (atomically); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, VOCAB_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({"format_version": FORMAT_VERSION, "user_features":
                 list(self.user_features), "item_features": list(self.item_features),
                 "columns": self.columns}, f)
    os.replace(path + ".tmp", path)
    return path

  @classmethod
  def load(cls, directory: str) -> "Vocabulary":
    path = os.path.join(directory, VOCAB_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
      return cls(d["columns"], d["user_features"], d["item_features"])
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f"{path}: cannot read the vocabulary ({e})") from e

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and (self.columns, self.user_features,
                                              self.item_features) == (
        other.columns, other.user_features, other.item_features)


def feature_columns(names: Sequence[str], config: OwnListsConfig
                    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The user and item feature columns of a file's header, in file order."""
  return (tuple(c for c in names if c.startswith(config.user_prefix)),
          tuple(c for c in names if c.startswith(config.item_prefix)))


def _history_values(arr: pa.Array, separator: str) -> pa.Array:
  """A ``history`` column as list<string> (CSV: ids joined by ``separator``)."""
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    arr = pc.split_pattern(arr, separator)
  if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
    raise ValueError(f"type {arr.type} is not a list")
  return pc.cast(arr, pa.list_(pa.string()))


def fit_vocabulary(config: OwnListsConfig) -> Vocabulary:
  """The vocabulary of ``config``'s files: users, items (candidates, histories,
  interactions) and feature values (one streamed pass per file)."""
  path = _check_path(config.lists, "lists")
  names = header(path)
  ufeat, ifeat = feature_columns(names, config)
  wanted = ["user_id", "item_id", "history", *ufeat, *ifeat]
  src = _Source(path, wanted, config.chunk_rows)
  for c in ("user_id", "item_id"):
    if c not in names:
      raise DataError(f"{path}: missing column {c!r}; the header has {names}")
  values: dict[str, list[pa.Array]] = {c: [] for c in ("user", "item", *ufeat, *ifeat)}
  t0, last, rows = time.time(), time.time(), 0
  for table in src.batches():
    rows += table.num_rows
    if time.time() - last > 5:
      last = time.time()
      logging.info("vocabulary: %d rows of %s read (%.0f rows/s)", rows, path,
                   rows / (last - t0))
    values["user"].append(pc.unique(_text(table.column("user_id"))))
    values["item"].append(pc.unique(_text(table.column("item_id"))))
    if "history" in table.column_names and config.interactions is None:
      try:
        hist = _history_values(table.column("history").combine_chunks(),
                               config.history_separator)
      except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{src.where(0, 'history')}: not a list of ids ({e})") from e
      values["item"].append(pc.unique(pc.list_flatten(hist)))
    for c in ufeat + ifeat:
      values[c].append(pc.unique(_text(table.column(c))))
  if config.interactions:
    isrc = _Source(_check_path(config.interactions, "interactions"),
                   ("user_id", "item_id"), config.chunk_rows)
    for table in isrc.batches():
      values["user"].append(pc.unique(_text(table.column("user_id"))))
      values["item"].append(pc.unique(_text(table.column("item_id"))))
  return Vocabulary.fit(values, ufeat, ifeat)


# -- histories from an interactions file --------------------------------------------------

class InteractionHistory:
  """The users' interactions, indexed by (user, time), for the histories of lists.

  Users are keyed by their raw id (so an unknown user at inference still gets their
  history); items by the vocabulary (unknown ones are dropped and counted).
  """

  def __init__(self, users: dict[str, int], key: np.ndarray, items: np.ndarray,
               times: np.ndarray, stats: dict[str, int]):
    self._users = users
    self._key = key            # user * (T + 1) + rank of the time, sorted
    self._items = items
    self._times = times        # the distinct times, sorted
    self.stats = stats

  @classmethod
  def load(cls, path: str, vocab: Vocabulary, config: OwnListsConfig
           ) -> "InteractionHistory":
    src = _Source(_check_path(path, "interactions"), (*INTERACTION_COLUMNS, "label"),
                  config.chunk_rows)
    missing = [c for c in INTERACTION_COLUMNS if c not in src.names]
    if missing:
      raise DataError(f"{path}: missing column(s) {missing}; the header has "
                      f"{src.names}")
    users: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {"user": [], "item": [], "time": []}
    stats = {"interactions": 0, "negatives_skipped": 0, "unknown_items": 0}
    row0 = 0
    for table in src.batches():
      n = table.num_rows
      for c in ("user_id", "item_id"):
        bad = _first_null(table.column(c).combine_chunks())
        if bad is not None:
          raise DataError(f"{src.where(row0 + bad, c)}: missing value")
      keep = np.ones(n, bool)
      if "label" in table.column_names:
        label = _numbers(src, table, "label", row0)
        _check_labels(src, label, row0)
        keep = label > 0
        stats["negatives_skipped"] += int((~keep).sum())
      times = _times(src, table, row0)
      items, unknown = vocab.lookup_items(table.column("item_id"))
      stats["unknown_items"] += unknown
      keep &= items > 0
      enc = pc.dictionary_encode(_text(table.column("user_id")))
      local = np.array([users.setdefault(u, len(users))
                        for u in enc.dictionary.to_pylist()], np.int64)
      uidx = local[enc.indices.to_numpy(zero_copy_only=False)]
      parts["user"].append(uidx[keep])
      parts["item"].append(items[keep])
      parts["time"].append(times[keep])
      stats["interactions"] += int(keep.sum())
      row0 += n
    user = np.concatenate(parts["user"]) if parts["user"] else np.zeros(0, np.int64)
    item = np.concatenate(parts["item"]) if parts["item"] else np.zeros(0, np.int32)
    when = np.concatenate(parts["time"]) if parts["time"] else np.zeros(0)
    distinct = np.unique(when)
    key = user * (len(distinct) + 1) + np.searchsorted(distinct, when)
    order = np.argsort(key, kind="stable")     # stable: ties keep file order
    logging.info("interactions %s: %d used for histories (%d negatives skipped, %d "
                 "unknown items)", path, stats["interactions"],
                 stats["negatives_skipped"], stats["unknown_items"])
    return cls(users, key[order], item[order].astype(np.int32), distinct, stats)

  def lookup(self, users: pa.Array, times: np.ndarray, size: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The last ``size`` items of each user before each time: ``[L, size]`` ids
    (right-aligned, most recent last) and their mask."""
    enc = pc.dictionary_encode(_text(users))
    local = np.array([self._users.get(u, -1) for u in enc.dictionary.to_pylist()],
                     np.int64)
    uidx = local[enc.indices.to_numpy(zero_copy_only=False)]
    span = len(self._times) + 1
    before = np.searchsorted(self._times, times, side="left")
    end = np.searchsorted(self._key, uidx * span + before, side="left")
    start = np.searchsorted(self._key, uidx * span, side="left")
    idx = end[:, None] - size + np.arange(size)[None, :]
    valid = (idx >= start[:, None]) & (uidx >= 0)[:, None]
    if len(self._items):
      hist = np.where(valid, self._items[np.clip(idx, 0, len(self._items) - 1)], 0)
    else:
      hist = np.zeros(idx.shape, np.int32)
    return hist.astype(np.int32), valid


def _check_labels(src: _Source, label: np.ndarray, row0: int) -> None:
  bad = np.flatnonzero((label != 0) & (label != 1))
  if len(bad):
    raise DataError(f"{src.where(row0 + int(bad[0]), 'label')}: value "
                    f"{label[bad[0]]:g} is not 0 or 1")


# -- the reader ------------------------------------------------------------------------

@dataclasses.dataclass
class ReadStats:
  """What reading lists found (per chunk; ``+`` adds them up).

  Attributes:
    lists / rows: lists and candidate rows read.
    truncated_lists / truncated_candidates: lists longer than ``n`` and the
      candidates cut from them (the last ones in upstream order).
    padded_lists: lists shorter than ``n``.
    lists_without_history: lists whose history is empty.
    unknown: per column (``user``, ``item``, ``history``, feature names), values
      not in the vocabulary (mapped to 0).
  """
  lists: int = 0
  rows: int = 0
  truncated_lists: int = 0
  truncated_candidates: int = 0
  padded_lists: int = 0
  lists_without_history: int = 0
  unknown: dict[str, int] = dataclasses.field(default_factory=dict)

  def __add__(self, other: "ReadStats") -> "ReadStats":
    unknown = dict(self.unknown)
    for k, v in other.unknown.items():
      unknown[k] = unknown.get(k, 0) + v
    return ReadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                        for f in dataclasses.fields(self) if f.name != "unknown"},
                     unknown=unknown)

  @property
  def total_unknown(self) -> int:
    return sum(self.unknown.values())

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class ListChunk:
  """Complete lists read from a lists file, in file order.

  Attributes:
    arrays: exactly the ``dnr_jax.batch.FIELDS``, leading axis = lists (labels zero
      when the file has none).
    list_ids: ``[L]`` raw list ids (as in the file).
    item_ids: ``[L, n]`` raw item ids in the arrays' order, ``None`` for padding.
    user_ids: ``[L]`` raw user ids.
    has_labels: whether the file has a ``label`` column.
    stats: this chunk's ``ReadStats``.
    times: ``[L]`` float64 list times (``None`` without a ``time`` column).
    splits: ``[L]`` split names (``None`` without a ``split`` column).
  """
  arrays: dict[str, np.ndarray]
  list_ids: np.ndarray
  item_ids: np.ndarray
  user_ids: np.ndarray
  has_labels: bool
  stats: ReadStats
  times: np.ndarray | None = None
  splits: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.list_ids)


def _per_list_constant(src, codes: np.ndarray, starts: np.ndarray, run: np.ndarray,
                       row0: int, column: str, lid: pa.Array, what: str) -> None:
  bad = np.flatnonzero(codes != codes[starts[run]])
  if len(bad):
    r = int(bad[0])
    raise DataError(f"{src.where(row0 + r, column)}: list {lid[r].as_py()!r} has several "
                    f"{what} (rows of one list must agree)")


def _codes(arr: pa.Array) -> np.ndarray:
  """Integer codes of values (nulls: -1), for equality tests."""
  enc = pc.dictionary_encode(arr)
  return enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


class _Reader:
  """Turns tables of complete lists into ``ListChunk``s (validating them)."""

  def __init__(self, src: _Source, vocab: Vocabulary, config: OwnListsConfig,
               history: InteractionHistory | None, require_labels: bool):
    self.src, self.vocab, self.config, self.history = src, vocab, config, history
    names = src.names
    missing = [c for c in REQUIRED + (("label",) if require_labels else ())
               if c not in names]
    if missing:
      hint = " (labels are needed to train)" if missing == ["label"] else ""
      raise DataError(f"{src.path}: missing column(s) {missing}{hint}; the header has "
                      f"{names}")
    ufeat, ifeat = feature_columns(names, config)
    if (ufeat, ifeat) != (vocab.user_features, vocab.item_features):
      logging.warning("%s: feature columns %s / %s differ from the vocabulary's %s / "
                      "%s: missing ones are 0 (unknown), extra ones ignored", src.path,
                      ufeat, ifeat, vocab.user_features, vocab.item_features)
    self.has = {c: c in names for c in ("label", "position", "time", "split", "history")}
    if history is not None and not self.has["time"]:
      raise DataError(f"{src.path}: missing column 'time': histories from an "
                      "interactions file are taken before each list's time")
    self.use_history_column = history is None and self.has["history"]
    if history is None and not self.has["history"]:
      logging.warning("%s: no history source (no interactions file, no 'history' "
                      "column): every history is empty", src.path)
    self.seen: set[str] = set()

  def chunk(self, table: pa.Table, row0: int) -> ListChunk:
    src, cfg, vocab = self.src, self.config, self.vocab
    n, h = cfg.list_size, cfg.history_size
    rows = table.num_rows
    stats = ReadStats(rows=rows)
    lid = _text(table.column("list_id"))
    for c in ("list_id", "user_id", "item_id"):
      bad = _first_null(table.column(c).combine_chunks())
      if bad is not None:
        raise DataError(f"{src.where(row0 + bad, c)}: missing value")
    lcodes = _codes(lid)
    is_start = np.r_[True, lcodes[1:] != lcodes[:-1]]
    starts = np.flatnonzero(is_start)
    run = np.cumsum(is_start) - 1
    lengths = np.diff(np.r_[starts, rows])
    num = len(starts)
    run_ids = lid.take(pa.array(starts)).to_pylist()
    for j, l in enumerate(run_ids):
      if l in self.seen:
        raise DataError(f"{src.where(row0 + int(starts[j]), 'list_id')}: list {l!r} "
                        "appears again after other lists: a list's rows must be "
                        "contiguous (sort the file by list_id)")
      self.seen.add(l)
    # Users, times, splits and user features belong to the list, not the row.
    uid = _text(table.column("user_id"))
    _per_list_constant(src, _codes(uid), starts, run, row0, "user_id", lid, "users")
    per_list = [("time", "times"), ("split", "splits")] + [
        (c, "values") for c in vocab.user_features if c in table.column_names]
    for c, what in per_list:
      if self.has.get(c, True):
        _per_list_constant(src, _codes(table.column(c).combine_chunks()), starts, run,
                           row0, c, lid, what)
    # One row per (list, item).
    iid = _text(table.column("item_id"))
    icodes = _codes(iid)
    key = run.astype(np.int64) * (int(icodes.max()) + 1) + icodes
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(dup):
      r = int(order[1:][dup].min())
      raise DataError(f"{src.where(row0 + r, 'item_id')}: item {iid[r].as_py()!r} "
                      f"appears twice in list {lid[r].as_py()!r}")
    score = _numbers(src, table, "score", row0)
    bad = np.flatnonzero(~np.isfinite(score))
    if len(bad):
      raise DataError(f"{src.where(row0 + int(bad[0]), 'score')}: non-finite score "
                      f"{score[bad[0]]}")
    if cfg.score_transform == "sigmoid":
      score = 1.0 / (1.0 + np.exp(-score))
    else:
      bad = np.flatnonzero((score < 0) | (score > 1))
      if len(bad):
        raise DataError(f"{src.where(row0 + int(bad[0]), 'score')}: score "
                        f"{score[bad[0]]:g} is outside [0, 1] (for logits set "
                        "score_transform=sigmoid, --score_transform=sigmoid)")
    if self.has["label"]:
      label = _numbers(src, table, "label", row0)
      _check_labels(src, label, row0)
    else:
      label = np.zeros(rows)
    # Upstream order: position, else score descending; ties in file order.
    if self.has["position"]:
      position = _numbers(src, table, "position", row0)
      order = np.lexsort((np.arange(rows), position, run))
      same = (run[order][1:] == run[order][:-1]) & (
          position[order][1:] == position[order][:-1])
      if same.any():
        r = int(order[1:][same].min())
        raise DataError(f"{src.where(row0 + r, 'position')}: position "
                        f"{position[r]:g} appears twice in list {lid[r].as_py()!r}")
    else:
      order = np.lexsort((np.arange(rows), -score, run))
    rank = np.arange(rows) - starts[run[order]]
    keep = rank < n
    sel, slot, lst = order[keep], rank[keep], run[order][keep]
    stats.lists = num
    stats.truncated_lists = int((lengths > n).sum())
    stats.truncated_candidates = int(np.maximum(lengths - n, 0).sum())
    stats.padded_lists = int((lengths < n).sum())
    unknown: dict[str, int] = {}

    def look(column, raw, count_as=None):
      ids, unk = vocab.lookup(column, raw)
      if unk:
        unknown[count_as or column] = unknown.get(count_as or column, 0) + unk
      return ids

    take = pa.array(sel)
    items = np.zeros((num, n), np.int32)
    items[lst, slot] = look("item", iid.take(take))
    scores = np.zeros((num, n), np.float32)
    scores[lst, slot] = score[sel]
    labels = np.zeros((num, n), np.float32)
    labels[lst, slot] = label[sel]
    mask = np.zeros((num, n), bool)
    mask[lst, slot] = True
    item_features = np.zeros((num, n, len(vocab.item_features)), np.int32)
    for j, c in enumerate(vocab.item_features):
      if c in table.column_names:
        item_features[lst, slot, j] = look(c, table.column(c).combine_chunks()
                                           .take(take))
    first = pa.array(starts)
    user = look("user", uid.take(first))
    user_features = np.zeros((num, len(vocab.user_features)), np.int32)
    for j, c in enumerate(vocab.user_features):
      if c in table.column_names:
        user_features[:, j] = look(c, table.column(c).combine_chunks().take(first))
    item_ids = np.full((num, n), None, object)
    item_ids[lst, slot] = np.asarray(
        table.column("item_id").combine_chunks().take(take).to_pylist(), object)
    times = _times(src, table, row0)[starts] if self.has["time"] else None
    splits = None
    if self.has["split"]:
      split_col = _text(table.column("split"))
      bad = _first_null(split_col)
      if bad is not None:
        raise DataError(f"{src.where(row0 + bad, 'split')}: missing value")
      splits = np.asarray(split_col.take(first).to_pylist(), object)
      wrong = np.flatnonzero(~np.isin(splits, SPLITS))
      if len(wrong):
        r = int(starts[wrong[0]])
        raise DataError(f"{src.where(row0 + r, 'split')}: {splits[wrong[0]]!r} is not "
                        f"one of {list(SPLITS)}")
    if self.history is not None:
      history, hmask = self.history.lookup(uid.take(first), times, h)
    elif self.use_history_column:
      history, hmask = self._history_column(table, starts, row0, look)
    else:
      history, hmask = np.zeros((num, h), np.int32), np.zeros((num, h), bool)
    stats.lists_without_history = int((~hmask.any(1)).sum())
    stats.unknown = unknown
    arrays = {"user": user, "history": history, "history_mask": hmask, "items": items,
              "scores": scores, "labels": labels, "mask": mask,
              "user_features": user_features, "item_features": item_features}
    assert tuple(arrays) == FIELDS
    return ListChunk(arrays=arrays, list_ids=np.asarray(
        table.column("list_id").combine_chunks().take(first).to_pylist(), object),
        item_ids=item_ids, user_ids=np.asarray(
            table.column("user_id").combine_chunks().take(first).to_pylist(), object),
        has_labels=self.has["label"], stats=stats, times=times, splits=splits)

  def _history_column(self, table, starts, row0, look):
    """Each list's history from its first row's ``history`` value (right-aligned)."""
    num, h = len(starts), self.config.history_size
    try:
      hist = _history_values(table.column("history").combine_chunks().take(
          pa.array(starts)), self.config.history_separator)
    except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
      raise DataError(f"{self.src.where(row0, 'history')}: not a list of ids ({e})"
                      ) from e
    flat = pc.list_flatten(hist)
    parent = pc.list_parent_indices(hist).to_numpy(zero_copy_only=False)
    ids = look("item", flat, "history") if len(flat) else np.zeros(0, np.int32)
    # Unknown (0) and empty entries are dropped; the last h known ones are kept.
    known = ids > 0
    ids, parent = ids[known], parent[known]
    count = np.bincount(parent, minlength=num)
    from_end = np.cumsum(count)[parent] - np.arange(len(ids)) - 1
    keep = from_end < h
    history = np.zeros((num, h), np.int32)
    hmask = np.zeros((num, h), bool)
    history[parent[keep], h - 1 - from_end[keep]] = ids[keep]
    hmask[parent[keep], h - 1 - from_end[keep]] = True
    return history, hmask


def read_lists(path: str, *, vocab: Vocabulary, config: OwnListsConfig,
               history: InteractionHistory | None = None,
               require_labels: bool = False) -> Iterator[ListChunk]:
  """Streams the lists of a lists file as ``ListChunk``s of complete lists.

  Args:
    path: a lists file in the format of the module doc (Parquet or CSV).
    vocab: maps raw ids; unknown ones become 0 and are counted in each chunk's stats.
    config: list size, history size, score transform, feature prefixes, chunk size.
    history: the interactions the histories come from (``InteractionHistory.load``);
      ``None``: the file's ``history`` column if any, else empty histories.
      ``config.interactions`` is not read here: load it and pass it.
    require_labels: raise ``DataError`` when the file has no ``label`` column.

  Yields:
    ``ListChunk``s of about ``config.chunk_rows`` rows each (a list is never split
    across chunks), in file order.

  Raises:
    DataError: the file is missing or malformed (one line: file, row, column,
      problem).
  """
  config.validate()
  src = _Source(_check_path(path, "lists"), (
      *REQUIRED, "label", "position", "time", "split", "history",
      *vocab.user_features, *vocab.item_features), config.chunk_rows)
  reader = _Reader(src, vocab, config, history, require_labels)
  pending, row0 = None, 0
  for table in src.batches():
    if pending is not None:
      table = pa.concat_tables([pending, table])
    lid = _codes(_text(table.column("list_id")))
    change = np.flatnonzero(lid[1:] != lid[:-1])
    # The last list may continue in the next batch: hold it back.
    cut = int(change[-1]) + 1 if len(change) else 0
    if cut:
      yield reader.chunk(table.slice(0, cut), row0)
      row0 += cut
    pending = table.slice(cut)
  if pending is not None and pending.num_rows:
    yield reader.chunk(pending, row0)
  elif pending is None:
    raise DataError(f"{src.path}: the file has no rows")


# -- what a trained run keeps, to rerank later ------------------------------------------

def save_for_run(workdir: str, config: OwnListsConfig, vocab_dir: str,
                 sizes: Mapping[str, Any] | None = None) -> str:
  """Copies the vocabulary into ``<workdir>/vocab/`` and writes
  ``<workdir>/data_config.json`` (the ``OwnListsConfig``, the format version and the
  vocabulary sizes), so that the run alone maps new lists the way it was trained.
  Returns the JSON's path."""
  vocab = Vocabulary.load(vocab_dir)
  vocab.save(os.path.join(workdir, "vocab"))
  path = os.path.join(workdir, RUN_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"format_version": FORMAT_VERSION,
               "data_config": dataclasses.asdict(config), "vocab_dir": "vocab",
               "num_users": vocab.num_users, "num_items": vocab.num_items,
               "user_features": list(vocab.user_features),
               "item_features": list(vocab.item_features),
               "user_feature_vocab": list(vocab.user_feature_vocab),
               "item_feature_vocab": list(vocab.item_feature_vocab),
               **dict(sizes or {})}, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def load_from_run(workdir: str) -> tuple[OwnListsConfig, Vocabulary]:
  """The ``OwnListsConfig`` and ``Vocabulary`` a run recorded (``save_for_run``)."""
  path = os.path.join(workdir, RUN_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    config = OwnListsConfig(**record["data_config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: cannot read the run's data config ({e}); was the run "
                    "trained on own lists (experiments.lists)?") from e
  if record.get("format_version", "").split(".")[0] != FORMAT_VERSION.split(".")[0]:
    raise DataError(f"{path}: format version {record.get('format_version')!r} is not "
                    f"readable by this code (format {FORMAT_VERSION})")
  return config, Vocabulary.load(os.path.join(workdir, record.get("vocab_dir", "vocab")))


def prepare_own_lists(config: OwnListsConfig):
  """Your lists as cached train / valid / test ``PreparedLists``; see
  ``dnr_jax.data.own_lists_builder.prepare_own_lists`` (imported on use: the reader
  itself does not need TFDS)."""
  from dnr_jax.data import own_lists_builder  # pylint: disable=g-import-not-at-top
  return own_lists_builder.prepare_own_lists(config)
