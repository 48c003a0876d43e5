"""The interaction log as a stream of blocks, and the passes that prepare it.

KuaiRand-27K's log has 322M rows (46 GB of CSV): it never sits in memory whole. The
raw TFDS data set stores it in records of up to 65,536 rows (``raw.RECORD_ROWS``),
and every stage that needs the whole log is a *pass* over those blocks that keeps
only per-id and per-time-bin counts:

1. ``k_core``: counting passes until no user or item falls below ``k`` rows
   (``preprocess.k_core_ids``); the last pass also gives the time histogram of the
   surviving rows, from which the time cuts are taken (``lists.time_splits``);
2. ``partition``: one pass that writes each surviving row, with dense ids, into the
   spill file of its *user shard* (consecutive users holding about ``shard_rows``
   rows), and collects the retriever's training positives (events before its cut);
3. ``load_shard``: one shard's rows, time-sorted, as an ``Interactions`` log that
   holds every row of its users, which is all the list protocols need
   (``lists.build_shard``).

Memory is O(``shard_rows`` + users + items + time bins), whatever the log's size;
disk holds the spilled rows (17 bytes a row) until the lists are written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterator, Optional

import numpy as np
from absl import logging

from dnr_jax.data import lists as lists_lib
from dnr_jax.data import preprocess
from dnr_jax.data import raw
from dnr_jax.data import types
from dnr_jax.errors import DataError

# A block: raw int64 ids, int64 time (ms since the epoch), int8 label; rows in file
# order, already filtered (e.g. KuaiRand's random exposures dropped).
Block = dict[str, np.ndarray]
_SPILL = {"user": np.int32, "item": np.int32, "time": np.int64, "label": np.int8}


@dataclasses.dataclass
class LogStream:
  """A cleaned interaction log, read block by block (see the module doc).

  Attributes:
    name: what the data is, for logs (says so when it is not the real data).
    is_real: False for generated samples and fixtures.
    read: returns a fresh iterator over the blocks (one pass).
    num_blocks: how many blocks a pass reads (for progress lines).
    user_features / item_features: raw ids ``[K]`` -> ``[K, F]`` int32 feature codes
      (0 for unknown ids, such as the padding entry).
    user_feature_vocab / item_feature_vocab: vocabulary size of each feature column.
  """
  name: str
  is_real: bool
  read: Callable[[], Iterator[Block]]
  num_blocks: int
  user_features: Callable[[np.ndarray], np.ndarray]
  item_features: Callable[[np.ndarray], np.ndarray]
  user_feature_vocab: tuple[int, ...] = ()
  item_feature_vocab: tuple[int, ...] = ()

  def blocks(self, what: str) -> Iterator[Block]:
    """One pass, with a progress line every few seconds."""
    t0 = last = time.time()
    rows = 0
    for i, block in enumerate(self.read()):
      rows += len(block["user"])
      yield block
      now = time.time()
      if now - last > 5 or i + 1 == self.num_blocks:
        last = now
        frac = (i + 1) / max(self.num_blocks, 1)
        logging.info("%s: %s: %5.1f%% of %d blocks, %d rows, %.0f rows/s, ETA %.0fs",
                     self.name, what, 100 * frac, self.num_blocks, rows,
                     rows / max(now - t0, 1e-9), (now - t0) * (1 - frac) / max(frac, 1e-9))

  def load(self) -> types.Interactions:
    """The whole log in memory: dense ids, time-sorted (stable), feature tables.

    For logs that fit in memory; ``prepare_lists`` never calls it.
    """
    parts = list(self.blocks("loading"))
    log = {k: np.concatenate([b[k] for b in parts]) for k in _SPILL}
    if not len(log["user"]):
      raise DataError(f"{self.name}: the log is empty")
    order = np.argsort(log["time"], kind="stable")
    log = {k: v[order] for k, v in log.items()}
    user, user_raw = raw.dense_ids(log["user"])
    item, item_raw = raw.dense_ids(log["item"])
    return types.Interactions(
        user=user, item=item, time=log["time"], label=log["label"].astype(np.int8),
        columns={}, user_raw_id=user_raw.astype(np.int64),
        item_raw_id=item_raw.astype(np.int64),
        user_features=self.user_features(user_raw), item_features=self.item_features(
            item_raw), user_feature_vocab=self.user_feature_vocab,
        item_feature_vocab=self.item_feature_vocab, name=self.name, is_real=self.is_real)


@dataclasses.dataclass
class Vocabulary:
  """The users and items that survive the k-core, and their dense ids.

  Attributes:
    dense_user / dense_item: raw id -> dense id (1..), 0 for filtered-out ids.
    user_raw_id / item_raw_id: dense id -> raw id (entry 0, padding, is -1).
    user_rows: ``[num_users]`` surviving rows of each dense user.
    rows: surviving rows in all.
    hist: the time histogram of the surviving rows.
  """
  dense_user: np.ndarray
  dense_item: np.ndarray
  user_raw_id: np.ndarray
  item_raw_id: np.ndarray
  user_rows: np.ndarray
  rows: int
  hist: lists_lib.TimeHistogram

  @property
  def num_users(self) -> int:
    return len(self.user_raw_id)

  @property
  def num_items(self) -> int:
    return len(self.item_raw_id)


def _count(counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """``counts`` (indexed by id, grown as needed) plus the occurrences of ``ids``.

  In place, and O(block) rather than O(largest id): KuaiRand-27K's video ids run to
  32M, and a pass reads thousands of blocks.
  """
  if not len(ids):
    return counts
  hi = int(ids.max())
  if hi >= len(counts):
    grown = np.zeros(max(hi + 1, 2 * len(counts)), np.int64)
    grown[:len(counts)] = counts
    counts = grown
  if hi < 4 * len(ids):    # dense ids (users): one bincount is cheapest
    counts[:hi + 1] += np.bincount(ids, minlength=hi + 1)
  else:
    uniq, n = np.unique(ids, return_counts=True)
    counts[uniq] += n
  return counts


def _fit(counts: np.ndarray, size: int) -> np.ndarray:
  """``counts`` cut or zero-padded to ``size``."""
  return counts[:size] if len(counts) >= size else np.pad(counts, (0, size - len(counts)))


def k_core(stream: LogStream, k: int) -> Vocabulary:
  """The k-core of a streamed log (``preprocess.k_core_ids``), pass by pass.

  The first pass also finds the time range; every later pass fills the time
  histogram of the rows it counts, so the last one (the fixpoint) holds the
  surviving rows' histogram. A log that needs no filtering gets one extra pass.
  """
  state = {"passes": 0, "t_min": None, "t_max": None, "hist": None}

  def count(keep_u: Optional[np.ndarray], keep_i: Optional[np.ndarray]):
    state["passes"] += 1
    cu, ci = np.zeros(0, np.int64), np.zeros(0, np.int64)
    hist = None
    if state["t_min"] is not None:
      hist = lists_lib.TimeHistogram(state["t_min"], state["t_max"])
    t_min, t_max = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for b in stream.blocks(f"{k}-core pass {state['passes']}"):
      m = preprocess.keep_mask(keep_u, b["user"]) & preprocess.keep_mask(keep_i,
                                                                          b["item"])
      cu = _count(cu, b["user"][m])
      ci = _count(ci, b["item"][m])
      if hist is not None:
        hist.add(b["time"][m])
      elif m.any():
        t_min, t_max = min(t_min, b["time"].min()), max(t_max, b["time"].max())
    if hist is None and t_min <= t_max:
      state["t_min"], state["t_max"] = int(t_min), int(t_max)
    state["hist"], state["user_counts"] = hist, cu
    # Masks indexed by raw id must cover every id of later passes: every pass
    # returns arrays as long as the first pass's (ids found then, plus one).
    state.setdefault("sizes", (len(cu), len(ci)))
    size, isize = state["sizes"]
    return _fit(cu, size), _fit(ci, isize)

  keep_u, keep_i = preprocess.k_core_ids(count, k, stream.name)
  hist = state["hist"]
  if hist is None:   # the first pass was the fixpoint: count the times once more
    hist = lists_lib.TimeHistogram(state["t_min"], state["t_max"])
    for b in stream.blocks("time histogram"):
      hist.add(b["time"])
  user_raw = np.flatnonzero(keep_u)
  item_raw = np.flatnonzero(keep_i)
  dense_user = np.zeros(len(keep_u), np.int32)
  dense_user[user_raw] = np.arange(1, len(user_raw) + 1, dtype=np.int32)
  dense_item = np.zeros(len(keep_i), np.int32)
  dense_item[item_raw] = np.arange(1, len(item_raw) + 1, dtype=np.int32)
  user_rows = np.concatenate([[0], state["user_counts"][user_raw]]).astype(np.int64)
  return Vocabulary(
      dense_user=dense_user, dense_item=dense_item,
      user_raw_id=np.concatenate([[-1], user_raw]).astype(np.int64),
      item_raw_id=np.concatenate([[-1], item_raw]).astype(np.int64),
      user_rows=user_rows, rows=hist.total, hist=hist)


def plan_shards(user_rows: np.ndarray, shard_rows: int) -> np.ndarray:
  """Shard of each dense user: consecutive users, about ``shard_rows`` rows a shard.

  A shard exceeds ``shard_rows`` by at most one user's rows (a user is never split:
  the list protocols need all of a user's rows together).
  """
  before = np.cumsum(user_rows) - user_rows
  return (before // max(shard_rows, 1)).astype(np.int32)


def partition(stream: LogStream, vocab: Vocabulary, shard_of_user: np.ndarray,
              retriever_end: int, spill_dir: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Spills the surviving rows into per-shard files; returns the retriever's positives.

  Rows keep their file order within a shard (``load_shard`` sorts them by time,
  stably, as the in-memory loader does). The positives (events with a positive
  label before ``retriever_end``) come back as dense ``(users, items, times)``
  sorted by user, item, then time, an order that does not depend on how the log was
  read (the dual-tower retriever reads a positive's history from the times).
  """
  files: dict[tuple[int, str], object] = {}
  pos_u, pos_i, pos_t = [], [], []
  try:
    for b in stream.blocks("partitioning into user shards"):
      u = vocab.dense_user[b["user"]]
      i = vocab.dense_item[b["item"]]
      keep = (u > 0) & (i > 0)
      rows = {"user": u[keep], "item": i[keep], "time": b["time"][keep],
              "label": b["label"][keep].astype(np.int8)}
      early = (rows["time"] < retriever_end) & (rows["label"] > 0)
      pos_u.append(rows["user"][early])
      pos_i.append(rows["item"][early])
      pos_t.append(rows["time"][early])
      shard = shard_of_user[rows["user"]]
      order = np.argsort(shard, kind="stable")
      bounds = np.flatnonzero(np.diff(shard[order])) + 1
      for part in np.split(order, bounds):
        if not len(part):
          continue
        s = int(shard[part[0]])
        for name, dtype in _SPILL.items():
          f = files.get((s, name))
          if f is None:
            f = files[(s, name)] = open(_spill_path(spill_dir, s, name), "ab")
          rows[name][part].astype(dtype).tofile(f)
  finally:
    for f in files.values():
      f.close()
  users, items = np.concatenate(pos_u), np.concatenate(pos_i)
  times = np.concatenate(pos_t)
  order = np.lexsort((times, items, users))
  return users[order], items[order], times[order]


def _spill_path(spill_dir: str, shard: int, name: str) -> str:
  return os.path.join(spill_dir, f"rows-{shard:05d}-{name}.bin")


def load_shard(spill_dir: str, shard: int, vocab: Vocabulary, features: dict,
               stream: LogStream) -> types.Interactions:
  """One shard's rows, time-sorted (stable), with the data set's ids and features.

  ``features`` holds the whole vocabulary's ``user_features`` / ``item_features``
  tables (computed once for all shards).
  """
  rows = {}
  for name, dtype in _SPILL.items():
    path = _spill_path(spill_dir, shard, name)
    rows[name] = np.fromfile(path, dtype) if os.path.exists(path) else np.zeros(0, dtype)
  order = np.argsort(rows["time"], kind="stable")
  return types.Interactions(
      user=rows["user"][order], item=rows["item"][order], time=rows["time"][order],
      label=rows["label"][order], columns={}, user_raw_id=vocab.user_raw_id,
      item_raw_id=vocab.item_raw_id, user_features=features["user_features"],
      item_features=features["item_features"],
      user_feature_vocab=stream.user_feature_vocab,
      item_feature_vocab=stream.item_feature_vocab, name=stream.name,
      is_real=stream.is_real)
