"""The reader: a lists file streamed as ``ListChunk``s of complete, validated lists.

A chunk's lists become the ``dnr_jax.batch`` arrays: candidates in upstream order,
cut or padded to ``list_size``, ids mapped through the ``Vocabulary``, histories from
an ``InteractionHistory`` or the file's ``history`` column.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from absl import logging

from dnr_jax.batch import FIELDS
from dnr_jax.data.own_lists import sources
from dnr_jax.data.own_lists.format import (REQUIRED, SPLITS, OwnListsConfig,
                                           check_path, feature_columns)
from dnr_jax.data.own_lists.histories import InteractionHistory, right_aligned
from dnr_jax.data.own_lists.vocabulary import Vocabulary
from dnr_jax.errors import DataError


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
class TruncatedCandidates:
  """The candidates cut from a chunk's lists longer than ``n``, in upstream order.

  Kept only on request (``read_lists(keep_truncated=True)``): reranking writes them
  after each list's reranked ``n``, so that its output has one row per input
  candidate; training never needs them.

  Attributes:
    lists: ``[R]`` the list of each candidate (index into the chunk's lists).
    positions: ``[R]`` 1-based upstream positions (all ``> n``).
    item_ids: ``[R]`` raw item ids (as in the file).
    scores: ``[R]`` float32 upstream scores (after ``score_transform``).
    labels: ``[R]`` float32 labels (0 when the file has none).
  """
  lists: np.ndarray
  positions: np.ndarray
  item_ids: np.ndarray
  scores: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.lists)


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
    truncated: the candidates cut to ``n`` (``read_lists(keep_truncated=True)``
      only; else ``None``).
  """
  arrays: dict[str, np.ndarray]
  list_ids: np.ndarray
  item_ids: np.ndarray
  user_ids: np.ndarray
  has_labels: bool
  stats: ReadStats
  times: np.ndarray | None = None
  splits: np.ndarray | None = None
  truncated: TruncatedCandidates | None = None

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

  def __init__(self, src: sources.Source, vocab: Vocabulary, config: OwnListsConfig,
               history: InteractionHistory | None, require_labels: bool,
               keep_truncated: bool = False):
    self.src, self.vocab, self.config, self.history = src, vocab, config, history
    self.keep_truncated = keep_truncated
    # The lists' times are compared with the interactions' once, on the first chunk.
    self.times_checked = False
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
    lid = sources.text(table.column("list_id"))
    for c in ("list_id", "user_id", "item_id"):
      bad = sources.first_null(table.column(c).combine_chunks())
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
    uid = sources.text(table.column("user_id"))
    _per_list_constant(src, _codes(uid), starts, run, row0, "user_id", lid, "users")
    per_list = [("time", "times"), ("split", "splits")] + [
        (c, "values") for c in vocab.user_features if c in table.column_names]
    for c, what in per_list:
      if self.has.get(c, True):
        _per_list_constant(src, _codes(table.column(c).combine_chunks()), starts, run,
                           row0, c, lid, what)
    # One row per (list, item).
    iid = sources.text(table.column("item_id"))
    icodes = _codes(iid)
    key = run.astype(np.int64) * (int(icodes.max()) + 1) + icodes
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(dup):
      r = int(order[1:][dup].min())
      raise DataError(f"{src.where(row0 + r, 'item_id')}: item {iid[r].as_py()!r} "
                      f"appears twice in list {lid[r].as_py()!r}")
    score = sources.numbers(src, table, "score", row0)
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
      label = sources.labels(src, table, row0)
    else:
      label = np.zeros(rows)
    # Upstream order: position, else score descending; ties in file order.
    if self.has["position"]:
      position = sources.numbers(src, table, "position", row0)
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
    times = sources.times(src, table, row0)[starts] if self.has["time"] else None
    splits = None
    if self.has["split"]:
      split_col = sources.text(table.column("split"))
      bad = sources.first_null(split_col)
      if bad is not None:
        raise DataError(f"{src.where(row0 + bad, 'split')}: missing value")
      splits = np.asarray(split_col.take(first).to_pylist(), object)
      wrong = np.flatnonzero(~np.isin(splits, SPLITS))
      if len(wrong):
        r = int(starts[wrong[0]])
        raise DataError(f"{src.where(row0 + r, 'split')}: {splits[wrong[0]]!r} is not "
                        f"one of {list(SPLITS)}")
    if self.history is not None:
      if not self.times_checked:
        self.times_checked = True
        mismatch = self.history.time_mismatch(times)
        if mismatch:
          logging.warning("%s: %s", src.path, mismatch)
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
    truncated = None
    if self.keep_truncated:
      cut = order[~keep]
      truncated = TruncatedCandidates(
          lists=run[cut], positions=(rank[~keep] + 1).astype(np.int32),
          item_ids=np.asarray(table.column("item_id").combine_chunks().take(
              pa.array(cut)).to_pylist(), object),
          scores=score[cut].astype(np.float32), labels=label[cut].astype(np.float32))
    return ListChunk(arrays=arrays, list_ids=np.asarray(
        table.column("list_id").combine_chunks().take(first).to_pylist(), object),
        item_ids=item_ids, user_ids=np.asarray(
            table.column("user_id").combine_chunks().take(first).to_pylist(), object),
        has_labels=self.has["label"], stats=stats, times=times, splits=splits,
        truncated=truncated)

  def _history_column(self, table, starts, row0, look):
    """Each list's history from its first row's ``history`` value (right-aligned)."""
    num, h = len(starts), self.config.history_size
    try:
      hist = sources.history_values(table.column("history").combine_chunks().take(
          pa.array(starts)), self.config.history_separator)
    except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
      raise DataError(f"{self.src.where(row0, 'history')}: not a list of ids ({e})"
                      ) from e
    flat = pc.list_flatten(hist)
    parent = pc.list_parent_indices(hist).to_numpy(zero_copy_only=False)
    ids = look("item", flat, "history") if len(flat) else np.zeros(0, np.int32)
    # Unknown (0) and empty entries are dropped; the last h known ones are kept.
    return right_aligned(ids, parent, num, h)


def read_lists(path: str, *, vocab: Vocabulary, config: OwnListsConfig,
               history: InteractionHistory | None = None,
               require_labels: bool = False, keep_truncated: bool = False
               ) -> Iterator[ListChunk]:
  """Streams the lists of a lists file as ``ListChunk``s of complete lists.

  Args:
    path: a lists file in the format of the package doc (Parquet or CSV).
    vocab: maps raw ids; unknown ones become 0 and are counted in each chunk's stats.
    config: list size, history size, score transform, feature prefixes, chunk size.
    history: the interactions the histories come from (``InteractionHistory.load``);
      ``None``: the file's ``history`` column if any, else empty histories.
      ``config.interactions`` is not read here: load it and pass it.
    require_labels: raise ``DataError`` when the file has no ``label`` column.
    keep_truncated: also return the candidates cut from lists longer than ``n``
      (``ListChunk.truncated``), for output that keeps every input row.

  Yields:
    ``ListChunk``s of about ``config.chunk_rows`` rows each (a list is never split
    across chunks), in file order.

  Raises:
    DataError: the file is missing or malformed (one line: file, row, column,
      problem).
  """
  config.validate()
  src = sources.Source(check_path(path, "lists"), (
      *REQUIRED, "label", "position", "time", "split", "history",
      *vocab.user_features, *vocab.item_features), config.chunk_rows)
  reader = _Reader(src, vocab, config, history, require_labels, keep_truncated)
  pending, row0 = None, 0
  for table in src.batches():
    if pending is not None:
      table = pa.concat_tables([pending, table])
    lid = _codes(sources.text(table.column("list_id")))
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
