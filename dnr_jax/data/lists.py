"""Reranking lists from an interaction log and a trained retriever.

The timeline is cut by time (``TimeSplits``): events before ``retriever_end`` (the
earliest ``retriever_fraction`` of the rows) are the retriever's, the rest are the
rerankers'. Lists are built from the later part only, so no list is scored by a
retriever that trained on it (open point 5 in ``docs/paper.md``: scores on lists the
retriever saw are over-confident and far less noisy than in production). Lists are
then split by the time of their first event: the last ``test_fraction`` of them
are the test lists, the ``valid_fraction`` before those the validation lists.

Protocols (``ListConfig.protocol``):

* ``exposure`` (default for KuaiRand): a list is a run of up to ``n`` consecutive
  impressions of one user, with their real labels. No invented candidates.
* ``retrieval`` (default for MovieLens): at the start of each window of ``window``
  positive interactions of a user, the candidates are the retriever's top ``n``
  items for the user, every item the user interacted with before excluded; a
  candidate is positive if the user interacts with it positively within that window.
  Lists without a positive stay in the training split (the reranker still learns
  from their negatives), are skipped by the metrics (no ranking signal) and are
  counted in the report.
* ``paper``: the paper's apparent construction, for comparison only (see ``_paper``).

Every list is stored in the ``dnr_jax.batch`` layout: candidates sorted by retriever
score (retriever rank order), history = the user's previous ``history_size``
*positive* interactions (most recent last; a user's positives say more about taste
than their skips).

Everything here works per user, so a log can be processed in shards of users
(``build_shard``, see ``dnr_jax.data.stream``): the retriever's cut is computed
once for the whole log before, the valid and test cuts from all lists' start times
after (``time_splits``), and ``assign`` then splits each shard's lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from absl import logging

from dnr_jax.data import dual_tower
from dnr_jax.data import retriever as retriever_lib
from dnr_jax.data import types
from dnr_jax.errors import DataError
from dnr_jax.errors import ConfigError

PROTOCOLS = ("exposure", "retrieval", "paper")


@dataclasses.dataclass(frozen=True)
class ListConfig:
  protocol: str = "exposure"
  list_size: int = 50            # n, the paper's 50 candidates
  history_size: int = 50         # H
  window: int = 6                # retrieval / paper: the next W interactions
  # Exposure lists shorter than this (a user's last, partial run) are dropped: with
  # few candidates every metric at K is trivially high. Counted in the report.
  min_list_size: int = 10
  retriever_fraction: float = 0.5  # earliest share of rows that trains the retriever
  valid_fraction: float = 0.1    # of the lists, by time
  test_fraction: float = 0.1

  def validate(self) -> None:
    if self.protocol not in PROTOCOLS:
      raise ConfigError(f"lists.protocol={self.protocol!r} is not one of {PROTOCOLS}")
    for name in ("list_size", "history_size", "window"):
      if getattr(self, name) < 1:
        raise ConfigError(f"lists.{name}={getattr(self, name)} must be >= 1")
    if not 1 <= self.min_list_size <= self.list_size:
      raise ConfigError(f"lists.min_list_size={self.min_list_size} must be in 1.."
                        f"{self.list_size} (lists.list_size)")
    if self.protocol == "paper" and self.window >= self.list_size:
      raise ConfigError(f"lists.window={self.window} must be < lists.list_size="
                        f"{self.list_size} for the paper protocol")
    if not 0 < self.retriever_fraction < 1:
      raise ConfigError(f"lists.retriever_fraction={self.retriever_fraction} must be "
                        "in (0, 1)")
    if self.valid_fraction <= 0 or self.test_fraction <= 0 or \
        self.valid_fraction + self.test_fraction >= 1:
      raise ConfigError(f"lists.valid_fraction={self.valid_fraction} and "
                        f"test_fraction={self.test_fraction} must be > 0 and sum < 1")


@dataclasses.dataclass(frozen=True)
class TimeSplits:
  """The cuts of the timeline, in the log's time unit (ms since the epoch).

  Rows with ``time < retriever_end`` train the retriever; lists start at or after
  it and belong to train, valid or test as their first event's time is before
  ``valid_start``, before ``test_start``, or later.
  """
  retriever_end: int
  valid_start: int
  test_start: int


class TimeHistogram:
  """Row counts per time bin: the quantiles of a log's times in bounded memory.

  At most ``max_bins`` bins of equal width cover ``[t_min, t_max]`` (for a month of
  KuaiRand, bins of 40 s; for ML-1M's 34 months, 23 min); quantiles are bin edges,
  so a cut is exact up to the rows of one bin.
  """

  def __init__(self, t_min: int, t_max: int, max_bins: int = 1 << 16):
    self.t_min = int(t_min)
    self.width = max(1, -(-(int(t_max) - self.t_min + 1) // max_bins))
    self.counts = np.zeros((int(t_max) - self.t_min) // self.width + 1, np.int64)

  def add(self, times: np.ndarray) -> None:
    if len(times):
      self.counts += np.bincount((np.asarray(times) - self.t_min) // self.width,
                                 minlength=len(self.counts))

  @property
  def total(self) -> int:
    return int(self.counts.sum())

  def rows_before(self, t: int) -> int:
    """Rows with time < ``t`` (``t`` a bin edge)."""
    return int(self.counts[:max(0, (t - self.t_min) // self.width)].sum())

  def edge(self, rows: float) -> int:
    """The first bin edge ``t`` with at least ``rows`` rows before it."""
    cum = np.cumsum(self.counts)
    b = int(np.searchsorted(cum, rows, side="left"))
    return self.t_min + (min(b, len(cum) - 1) + 1) * self.width


def retriever_end(hist: TimeHistogram, config: ListConfig) -> int:
  """The time before which ``config.retriever_fraction`` of the rows lie."""
  if hist.total == 0:
    raise DataError("the log is empty: no time to split")
  return hist.edge(config.retriever_fraction * hist.total)


def retriever_end_of(times: np.ndarray, config: ListConfig) -> int:
  """``retriever_end`` of an in-memory array of times (the same bins as a stream)."""
  if not len(times):
    raise DataError("the log is empty: no time to split")
  hist = TimeHistogram(times.min(), times.max())
  hist.add(times)
  return retriever_end(hist, config)


def time_splits(end: int, start_times: np.ndarray, config: ListConfig) -> TimeSplits:
  """The cuts, given the retriever's and the first-event times of all lists.

  The last ``round(test_fraction * lists)`` lists (at least one) by first event
  are the test lists, the ``valid_fraction`` before them the validation lists; lists
  that start at the same time as a cut's list go with it.
  """
  t = np.sort(np.asarray(start_times))
  n = len(t)
  n_test = max(1, int(round(n * config.test_fraction)))
  n_valid = max(1, int(round(n * config.valid_fraction)))
  if n < n_test + n_valid + 1:
    raise DataError(f"only {n} lists: too few for a train, a valid and a test split")
  return TimeSplits(int(end), int(t[n - n_test - n_valid]), int(t[n - n_test]))


def _history_index(log: types.Interactions, positive_only: bool):
  """Rows (positive ones, or all) sorted by (user, time), for ``_histories``."""
  rows = np.flatnonzero(log.label > 0) if positive_only else np.arange(log.num_rows)
  # Rows are in time order, so (user, row) sorts a user's rows by time.
  key = log.user[rows].astype(np.int64) * log.num_rows + rows
  order = np.argsort(key, kind="stable")
  return key[order], rows[order]


def _histories(log: types.Interactions, users: np.ndarray, before_row: np.ndarray,
               size: int, positive_only: bool = True, index=None
               ) -> tuple[np.ndarray, np.ndarray]:
  """The ``size`` most recent (positive) items of each user strictly before a row.

  ``index`` (from ``_history_index``) saves re-sorting the log on repeated calls.
  """
  key, rows = index or _history_index(log, positive_only)
  end = np.searchsorted(key, users.astype(np.int64) * log.num_rows + before_row)
  idx = end[:, None] - size + np.arange(size)[None, :]
  valid = idx >= 0
  idx = np.clip(idx, 0, max(len(rows) - 1, 0))
  if len(rows):
    valid &= log.user[rows[idx]] == users[:, None]
    items = np.where(valid, log.item[rows[idx]], 0)
  else:
    items = np.zeros(idx.shape, np.int32)
  return items.astype(np.int32), valid


def _sort_by_score(items, scores, labels, mask):
  order = np.argsort(np.where(mask, -scores, np.inf), axis=1, kind="stable")
  take = lambda a: np.take_along_axis(a, order, 1)
  return take(items), take(scores), take(labels), take(mask)


def _by_user(log, rows):
  """``rows`` regrouped by user (time order kept within a user).

  Returns ``(rows, users, first, pos_in_user)``: ``first`` marks each user's first
  row and ``pos_in_user`` counts a row's position within its user's rows.
  """
  rows = rows[np.lexsort((rows, log.user[rows]))]
  users = log.user[rows]
  first = np.r_[True, users[1:] != users[:-1]]
  run_start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
  return rows, users, first, np.arange(len(rows)) - run_start


# A trained retriever: MF's parameters or a dual tower.
Retriever = retriever_lib.MFParams | dual_tower.DualTower


def _retriever_view(log, params, users, rows):
  """MF-shaped parameters and their user ids for lists of ``users`` starting at
  ``rows``: MF's own, or one row per list with the dual tower's user tower on the
  list's history (the user's positives before the list)."""
  if isinstance(params, retriever_lib.MFParams):
    return params, users
  history, hmask = _histories(log, users, rows, params.history_size)
  return params.as_mf(history, hmask, users), np.arange(len(users), dtype=np.int32)


def _exposure(log, params, start, config):
  rows, users, first, pos_in_user = _by_user(log, np.arange(start, log.num_rows))
  new_list = first | (pos_in_user % config.list_size == 0)
  list_id = np.cumsum(new_list) - 1
  slot = pos_in_user % config.list_size
  num = int(list_id[-1]) + 1 if len(rows) else 0
  n = config.list_size
  items = np.zeros((num, n), np.int32)
  labels = np.zeros((num, n), np.float32)
  mask = np.zeros((num, n), bool)
  items[list_id, slot] = log.item[rows]
  labels[list_id, slot] = log.label[rows]
  mask[list_id, slot] = True
  list_user = users[new_list]
  list_row = rows[new_list]                     # the list's first impression
  view, view_users = _retriever_view(log, params, list_user, list_row)
  scores = np.where(mask, retriever_lib.score_lists(view, view_users, items), 0.0)
  return list_user, list_row, items, scores.astype(np.float32), labels, mask


def _retrieve(log, params, users, before_row, n, also_exclude=None, chunk=2048):
  """The retriever's top ``n`` for each (user, time), excluding EVERY item the user
  interacted with before (any label): a rated movie is not rated again, so a seen item
  among the candidates would be a sure negative with a high score (inverted AUC)."""
  rows_before = np.searchsorted(
      np.sort(log.user.astype(np.int64) * log.num_rows + np.arange(log.num_rows)),
      users.astype(np.int64) * log.num_rows + before_row) - np.searchsorted(
          np.sort(log.user.astype(np.int64)), users)
  if not len(users):
    return np.zeros((0, n), np.int32), np.zeros((0, n), np.float32)
  extra = 0 if also_exclude is None else also_exclude.shape[1]
  if log.num_items - 1 - n - extra < 1:   # no room for even one seen item
    raise DataError(f"{log.name}: lists of {n + extra} candidates need more than "
                    f"{n + extra + 1} items; the log has {log.num_items - 1} (lower "
                    "--list_size)")
  size = int(min(max(rows_before.max(initial=1), 1), log.num_items - 1 - n - extra))
  # [chunk, size] seen items at a time: heavy users have seen thousands.
  chunk = max(1, min(chunk, (1 << 24) // size))
  index = _history_index(log, positive_only=False)
  items, scores = [], []
  for s in range(0, len(users), chunk):
    sl = slice(s, s + chunk)
    seen, _ = _histories(log, users[sl], before_row[sl], size, index=index)
    if also_exclude is not None:
      seen = np.concatenate([seen, also_exclude[sl]], 1)
    view, view_users = _retriever_view(log, params, users[sl], before_row[sl])
    i, sc = retriever_lib.top_n(view, view_users, seen, n)
    items.append(i)
    scores.append(sc)
  return np.concatenate(items), np.concatenate(scores)


def _retrieval(log, params, start, config):
  rows, users, _, pos_in_user = _by_user(
      log, np.flatnonzero(log.label[start:] > 0) + start)   # positive interactions
  starts = np.flatnonzero(pos_in_user % config.window == 0)
  list_user, list_row = users[starts], rows[starts]
  # The window: the next `window` positives of the same user.
  widx = starts[:, None] + np.arange(config.window)[None, :]
  wvalid = widx < len(rows)
  widx = np.clip(widx, 0, len(rows) - 1)
  wvalid &= users[widx] == list_user[:, None]
  window_items = np.where(wvalid, log.item[rows[widx]], -1)
  # Everything the user interacted with before the list is excluded from retrieval.
  items, scores = _retrieve(log, params, list_user, list_row, config.list_size)
  labels = (items[:, :, None] == window_items[:, None, :]).any(-1).astype(np.float32)
  mask = np.ones_like(items, bool)
  return list_user, list_row, items, scores, labels, mask


def _paper(log, params, start, config):
  logging.warning(
      "lists.protocol='paper': the next %d interactions are forced in beside the "
      "retriever's top %d. They score systematically lower than its own picks, so the "
      "score alone finds them (inverted, leaked signal; see raw_score_auc). Use it only "
      "to reproduce the paper's construction, never for conclusions.",
      config.window, config.list_size - config.window)
  rows, users, _, pos_in_user = _by_user(log, np.arange(start, log.num_rows))
  starts = np.flatnonzero(pos_in_user % config.window == 0)
  list_user, list_row = users[starts], rows[starts]
  widx = starts[:, None] + np.arange(config.window)[None, :]
  wvalid = widx < len(rows)
  widx = np.clip(widx, 0, len(rows) - 1)
  wvalid &= users[widx] == list_user[:, None]
  shown = np.where(wvalid, log.item[rows[widx]], 0).astype(np.int32)
  shown_label = np.where(wvalid, log.label[rows[widx]], 0).astype(np.float32)
  top, top_scores = _retrieve(log, params, list_user, list_row,
                              config.list_size - config.window, also_exclude=shown)
  view, view_users = _retriever_view(log, params, list_user, list_row)
  shown_scores = retriever_lib.score_lists(view, view_users, shown)
  items = np.concatenate([top, shown], 1)
  scores = np.concatenate([top_scores, np.where(wvalid, shown_scores, 0.0)], 1)
  labels = np.concatenate([np.zeros_like(top_scores), shown_label], 1)
  mask = np.concatenate([np.ones_like(top, bool), wvalid], 1)
  return list_user, list_row, items, scores.astype(np.float32), labels, mask


_BUILDERS = {"exposure": _exposure, "retrieval": _retrieval, "paper": _paper}


SCORE_BINS = 1 << 16


@dataclasses.dataclass
class ListStats:
  """Statistics of built lists, gathered split by split (and shard by shard).

  Per split: lists, candidates, positives, lists without a positive, and histograms
  of the retriever scores of positive and negative candidates (``SCORE_BINS`` bins
  on [0, 1]), from which the raw-score AUC is computed exactly up to ties within a
  bin (1.5e-5 wide).
  """
  splits: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: {
      name: {"lists": 0, "candidates": 0, "positives": 0, "lists_without_positive": 0,
             "pos_hist": np.zeros(SCORE_BINS, np.int64),
             "neg_hist": np.zeros(SCORE_BINS, np.int64)}
      for name in SPLITS})
  short_lists_dropped: int = 0
  list_rows: int = 0

  def add_split(self, name: str, split: dict[str, np.ndarray]) -> None:
    s = self.splits[name]
    labels, mask, scores = split["labels"], split["mask"], split["scores"]
    pos = (labels * mask).sum(1)
    s["lists"] += int(len(labels))
    s["candidates"] += int(mask.sum())
    s["positives"] += int(pos.sum())
    s["lists_without_positive"] += int((pos == 0).sum())
    bins = np.clip((scores * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
    s["pos_hist"] += np.bincount(bins[mask & (labels > 0)], minlength=SCORE_BINS)
    s["neg_hist"] += np.bincount(bins[mask & (labels <= 0)], minlength=SCORE_BINS)

  def report(self) -> dict[str, Any]:
    """The preparation report's list part (JSON-ready)."""
    out: dict[str, Any] = {"short_lists_dropped": self.short_lists_dropped,
                           "list_rows": self.list_rows}
    for name in SPLITS:
      s = self.splits[name]
      out[name] = {
          "lists": s["lists"], "candidates": s["candidates"],
          "positives_per_list": s["positives"] / max(s["lists"], 1),
          "lists_without_positive": s["lists_without_positive"],
          "raw_score_auc": histogram_auc(s["pos_hist"], s["neg_hist"])}
    return out


def histogram_auc(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
  """AUC of scores binned into histograms: P(pos > neg), ties in a bin counting 1/2."""
  p, n = pos_hist.astype(np.float64), neg_hist.astype(np.float64)
  if p.sum() == 0 or n.sum() == 0:
    return 0.5
  neg_below = np.cumsum(n) - n
  return float((p * neg_below).sum() + 0.5 * (p * n).sum()) / (p.sum() * n.sum())


SPLITS = ("train", "valid", "test")


def build_shard(log: types.Interactions, params: Retriever, config: ListConfig,
                end: int) -> tuple[dict[str, np.ndarray], int]:
  """Lists of ``config.protocol`` from the rows of ``log`` at or after ``end``.

  Args:
    log: every row of some users (a shard, or the whole log), sorted by time; ids
      and feature tables of the whole data set.
    params: the retriever (MF or dual tower), trained on rows before ``end`` only.
    config: the list protocol.
    end: the retriever's cut (``retriever_end``), the same for every shard.

  Returns:
    ``(lists, short_lists_dropped)``: arrays in the ``dnr_jax.batch`` layout plus
    ``start_time`` (each list's first event), in the order of ``start_time``.
  """
  config.validate()
  start = int(np.searchsorted(log.time, end, side="left"))
  fields = ("user", "first_row", "items", "scores", "labels", "mask")
  if start < log.num_rows:
    built = dict(zip(fields, _BUILDERS[config.protocol](log, params, start, config)))
  else:
    built = dict(zip(fields, (np.zeros((0,), np.int32), np.zeros((0,), np.int64)) + tuple(
        np.zeros((0, config.list_size), d) for d in (np.int32, np.float32, np.float32,
                                                      bool))))
  dropped = 0
  if config.protocol == "exposure":
    short = built["mask"].sum(1) < config.min_list_size
    dropped = int(short.sum())
    built = {k: v[~short] for k, v in built.items()}
  order = np.argsort(built["first_row"], kind="stable")
  built = {k: v[order] for k, v in built.items()}
  items, scores, labels, mask = _sort_by_score(built["items"], built["scores"],
                                               built["labels"], built["mask"])
  users, first_row = built["user"], built["first_row"]
  history, hmask = _histories(log, users, first_row, config.history_size)
  return {"user": users.astype(np.int32), "history": history, "history_mask": hmask,
          "items": items, "scores": scores, "labels": labels, "mask": mask,
          "user_features": log.user_features[users],
          "item_features": log.item_features[items],
          "start_time": log.time[first_row]}, dropped


def assign(built: dict[str, np.ndarray], splits: TimeSplits
           ) -> dict[str, dict[str, np.ndarray]]:
  """``build_shard``'s lists by split (``TimeSplits``), without ``start_time``."""
  t = built["start_time"]
  which = np.where(t < splits.valid_start, 0, np.where(t < splits.test_start, 1, 2))
  return {name: {k: v[which == i] for k, v in built.items() if k != "start_time"}
          for i, name in enumerate(SPLITS)}


def check_report(report: dict[str, Any], name: str, protocol: str) -> None:
  """Fails when a split has no list; warns when the raw scores look uninformative."""
  for split in SPLITS:
    if report[split]["lists"] == 0:
      raise DataError(f"{name}: no {protocol} list starts in the {split} period; the "
                      "log is too small or too short for lists.valid_fraction / "
                      "test_fraction / retriever_fraction")
    auc = report[split]["raw_score_auc"]
    if protocol != "paper" and auc <= 0.5:
      logging.warning("%s: the raw retriever score has AUC %.3f <= 0.5 on %s lists: "
                      "scores are uninformative or inverted", name, auc, split)


def build_lists(log: types.Interactions, params: Retriever, config: ListConfig,
                end: int | None = None) -> types.PreparedLists:
  """All lists of an in-memory log (``build_shard`` on the whole log, then ``assign``).

  Args:
    log: the (preprocessed) interaction log, sorted by time.
    params: the retriever (MF or dual tower), trained on the rows before ``end``.
    config: the list protocol.
    end: the retriever's cut (default: ``retriever_end_of(log.time, config)``).

  Returns:
    Train / valid / test lists with the preparation report: counts, positives per
    list, lists without a positive, the AUC of the raw retriever score against the
    labels per split, and the cuts.
  """
  config.validate()
  end = retriever_end_of(log.time, config) if end is None else end
  built, dropped = build_shard(log, params, config, end)
  if not len(built["user"]):
    raise DataError(f"no {config.protocol} list could be built from {log.name!r}")
  splits = time_splits(end, built["start_time"], config)
  out = assign(built, splits)
  stats = ListStats(short_lists_dropped=dropped,
                    list_rows=int((log.time >= end).sum()))
  for name, split in out.items():
    stats.add_split(name, split)
  report = {"protocol": config.protocol, "time_splits": dataclasses.asdict(splits),
            "retriever_rows": log.num_rows - stats.list_rows, **stats.report()}
  check_report(report, log.name, config.protocol)
  for name in SPLITS:
    logging.info("%s lists: %s", name, report[name])
  return types.PreparedLists(
      splits=out, num_items=log.num_items, num_users=log.num_users,
      user_feature_vocab=log.user_feature_vocab,
      item_feature_vocab=log.item_feature_vocab, report=report,
      name=f"{log.name} ({config.protocol} lists)", is_real=log.is_real)
