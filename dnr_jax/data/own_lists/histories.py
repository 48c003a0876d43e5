"""Histories from an interactions file: each list's user's last items before its time.

The interactions are held in memory, sorted by (user, time), so that a chunk of lists
finds its histories with a few binary searches. Nothing checks that the two files
count time in the same unit, and a wrong guess is silent (lists in milliseconds
against interactions in seconds take every click as the past, the future included):
``time_mismatch`` compares the two ranges, and the reader warns on the first chunk.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from absl import logging

from dnr_jax.data.own_lists import sources
from dnr_jax.data.own_lists.format import (INTERACTION_COLUMNS, OwnListsConfig,
                                           check_path)
from dnr_jax.data.own_lists.vocabulary import Vocabulary
from dnr_jax.errors import DataError

# Medians of the list and interaction times further apart than this factor are on
# different clocks (1,000 between milliseconds and seconds, 86,400 seconds to days).
TIME_RATIO = 100.0


class InteractionHistory:
  """The users' interactions, indexed by (user, time), for the histories of lists.

  Users are keyed by their raw id (so an unknown user at inference still gets their
  history); items by the vocabulary (unknown ones are dropped and counted).
  """

  def __init__(self, users: dict[str, int], key: np.ndarray, items: np.ndarray,
               times: np.ndarray, stats: dict[str, int], path: str = "",
               time_range: tuple[float, float, float] | None = None):
    self._users = users
    self._key = key            # user * (T + 1) + rank of the time, sorted
    self._items = items
    self._times = times        # the distinct times, sorted
    self.stats = stats
    self.path = path
    # (min, median, max) of the interactions' times, None without interactions.
    self.time_range = time_range

  @classmethod
  def load(cls, path: str, vocab: Vocabulary, config: OwnListsConfig
           ) -> "InteractionHistory":
    src = sources.Source(check_path(path, "interactions"),
                         (*INTERACTION_COLUMNS, "label"), config.chunk_rows)
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
        bad = sources.first_null(table.column(c).combine_chunks())
        if bad is not None:
          raise DataError(f"{src.where(row0 + bad, c)}: missing value")
      keep = np.ones(n, bool)
      if "label" in table.column_names:
        label = sources.labels(src, table, row0)
        keep = label > 0
        stats["negatives_skipped"] += int((~keep).sum())
      times = sources.times(src, table, row0)
      items, unknown = vocab.lookup_items(table.column("item_id"))
      stats["unknown_items"] += unknown
      keep &= items > 0
      enc = pc.dictionary_encode(sources.text(table.column("user_id")))
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
    time_range = ((float(when.min()), float(np.median(when)), float(when.max()))
                  if len(when) else None)
    return cls(users, key[order], item[order].astype(np.int32), distinct, stats,
               path=path, time_range=time_range)

  def time_mismatch(self, times: np.ndarray | None) -> str | None:
    """Why the lists' ``times`` and the interactions' do not plausibly share a clock,
    or ``None`` when they do.

    Implausible: medians more than ``TIME_RATIO`` apart (milliseconds against
    seconds, seconds against days), or every list before the first interaction
    (no list gets a history). Lists entirely after the interactions are the ordinary
    case of reranking new lists with the log so far, and pass.
    """
    if times is None or not len(times) or self.time_range is None:
      return None
    lo, med, hi = float(np.min(times)), float(np.median(times)), float(np.max(times))
    ilo, imed, ihi = self.time_range
    problem = None
    ratio = max(med / imed, imed / med) if med > 0 and imed > 0 else 1.0
    if ratio > TIME_RATIO:
      problem = (f"their medians differ by a factor of {ratio:,.0f} (milliseconds "
                 "against seconds?)")
    elif hi < ilo:
      problem = ("every list is older than the first interaction (no list gets a "
                 "history)")
    if problem is None:
      return None
    return (f"list and interaction times do not overlap plausibly: lists {lo:.6g} .. "
            f"{hi:.6g} (median {med:.6g}), interactions in {self.path or '?'} "
            f"{ilo:.6g} .. {ihi:.6g} (median {imed:.6g}): {problem}; a history holds "
            "the interactions strictly before its list's time, so give both files' "
            "times in the same unit")

  def lookup(self, users: pa.Array, times: np.ndarray, size: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The last ``size`` items of each user before each time: ``[L, size]`` ids
    (right-aligned, most recent last) and their mask."""
    enc = pc.dictionary_encode(sources.text(users))
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


def right_aligned(ids: np.ndarray, parent: np.ndarray, num: int, size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(history [num, size], mask)`` from the flat ids of ``num`` histories.

  ``ids`` holds every history's ids in order (oldest first), ``parent`` the history
  each belongs to (non-decreasing). Unknown ids (0) are dropped and each history's
  last ``size`` known ids kept, right-aligned (padding first): the layout of
  ``dnr_jax.batch``'s ``history``, for the lists file's ``history`` column and for
  online requests alike.
  """
  known = ids > 0
  ids, parent = ids[known], parent[known]
  count = np.bincount(parent, minlength=num)
  from_end = np.cumsum(count)[parent] - np.arange(len(ids)) - 1
  keep = from_end < size
  history = np.zeros((num, size), np.int32)
  mask = np.zeros((num, size), bool)
  history[parent[keep], size - 1 - from_end[keep]] = ids[keep]
  mask[parent[keep], size - 1 - from_end[keep]] = True
  return history, mask
