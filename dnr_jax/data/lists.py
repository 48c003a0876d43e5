"""Reranking lists from an interaction log and a trained retriever.

The timeline is split once: the earliest ``retriever_fraction`` of the rows (by time)
is the retriever's, the rest is the rerankers'. Lists are built from the later part
only, so no list is scored by a retriever that trained on it (open point 5 of the
paper note: scores on lists the retriever saw are over-confident and far less noisy
than in production). Lists are then split train / valid / test by time.

Protocols (``ListConfig.protocol``):

* ``exposure`` (default for KuaiRand): a list is a run of up to ``n`` consecutive
  impressions of one user, with their real labels. No invented candidates.
* ``retrieval`` (default for MovieLens): at the start of each window of ``window``
  interactions of a user, the candidates are the retriever's top ``n`` items for the
  user, history excluded; a candidate is positive if the user interacts with it
  positively within that window. Lists without a positive stay in the training split
  (the reranker still learns from their negatives), are skipped by the metrics (no
  ranking signal) and are counted in the report.

Every list is stored in the ``dnr_jax.batch`` layout: candidates sorted by retriever
score (retriever rank order), history = the user's previous ``history_size``
*positive* interactions (most recent last; a user's positives say more about taste
than their skips).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from absl import logging

from dnr_jax import metrics
from dnr_jax.data import retriever as retriever_lib
from dnr_jax.data import types

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
      raise ValueError(f"lists.protocol={self.protocol!r} is not one of {PROTOCOLS}")
    for name in ("list_size", "history_size", "window"):
      if getattr(self, name) < 1:
        raise ValueError(f"lists.{name}={getattr(self, name)} must be >= 1")
    if not 1 <= self.min_list_size <= self.list_size:
      raise ValueError(f"lists.min_list_size={self.min_list_size} must be in 1.."
                       f"{self.list_size} (lists.list_size)")
    if self.protocol == "paper" and self.window >= self.list_size:
      raise ValueError(f"lists.window={self.window} must be < lists.list_size="
                       f"{self.list_size} for the paper protocol")
    if not 0 < self.retriever_fraction < 1:
      raise ValueError(f"lists.retriever_fraction={self.retriever_fraction} must be "
                       "in (0, 1)")
    if self.valid_fraction <= 0 or self.test_fraction <= 0 or \
        self.valid_fraction + self.test_fraction >= 1:
      raise ValueError(f"lists.valid_fraction={self.valid_fraction} and "
                       f"test_fraction={self.test_fraction} must be > 0 and sum < 1")


def retriever_cutoff(log: types.Interactions, config: ListConfig) -> int:
  """Rows ``[0, cutoff)`` (the log is sorted by time) belong to the retriever."""
  return int(log.num_rows * config.retriever_fraction)


def _histories(log: types.Interactions, users: np.ndarray, before_row: np.ndarray,
               size: int, positive_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The ``size`` most recent (positive) items of each user strictly before a row."""
  pos = np.flatnonzero(log.label > 0) if positive_only else np.arange(log.num_rows)
  # Rows are in time order, so (user, row) sorts a user's positives by time.
  key = log.user[pos].astype(np.int64) * log.num_rows + pos
  order = np.argsort(key, kind="stable")
  key, pos = key[order], pos[order]
  end = np.searchsorted(key, users.astype(np.int64) * log.num_rows + before_row)
  idx = end[:, None] - size + np.arange(size)[None, :]
  valid = idx >= 0
  idx = np.clip(idx, 0, max(len(pos) - 1, 0))
  if len(pos):
    valid &= log.user[pos[idx]] == users[:, None]
    items = np.where(valid, log.item[pos[idx]], 0)
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
  scores = np.where(mask, np.asarray(retriever_lib.score(
      params, jnp.asarray(np.repeat(list_user[:, None], n, 1)), jnp.asarray(items))), 0.0)
  return list_user, list_row, items, scores.astype(np.float32), labels, mask


def _retrieve(log, params, users, before_row, n, also_exclude=None, chunk=2048):
  """The retriever's top ``n`` for each (user, time), excluding EVERY item the user
  interacted with before (any label): a rated movie is not rated again, so a seen item
  among the candidates would be a sure negative with a high score (inverted AUC)."""
  rows_before = np.searchsorted(
      np.sort(log.user.astype(np.int64) * log.num_rows + np.arange(log.num_rows)),
      users.astype(np.int64) * log.num_rows + before_row) - np.searchsorted(
          np.sort(log.user.astype(np.int64)), users)
  extra = 0 if also_exclude is None else also_exclude.shape[1]
  size = int(min(max(rows_before.max(initial=1), 1), log.num_items - 1 - n - extra))
  items, scores = [], []
  for s in range(0, len(users), chunk):
    sl = slice(s, s + chunk)
    seen, _ = _histories(log, users[sl], before_row[sl], size, positive_only=False)
    if also_exclude is not None:
      seen = np.concatenate([seen, also_exclude[sl]], 1)
    i, sc = retriever_lib.top_n(params, users[sl], seen, n)
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
  shown_scores = np.asarray(retriever_lib.score(
      params, jnp.asarray(np.repeat(list_user[:, None], config.window, 1)),
      jnp.asarray(shown)))
  items = np.concatenate([top, shown], 1)
  scores = np.concatenate([top_scores, np.where(wvalid, shown_scores, 0.0)], 1)
  labels = np.concatenate([np.zeros_like(top_scores), shown_label], 1)
  mask = np.concatenate([np.ones_like(top, bool), wvalid], 1)
  return list_user, list_row, items, scores.astype(np.float32), labels, mask


_BUILDERS = {"exposure": _exposure, "retrieval": _retrieval, "paper": _paper}


def build_lists(log: types.Interactions, params: retriever_lib.MFParams,
                config: ListConfig) -> types.PreparedLists:
  """Lists of ``config.protocol`` from the rows after the retriever's cut-off.

  Args:
    log: the (preprocessed) interaction log, sorted by time.
    params: the retriever trained on rows ``[0, retriever_cutoff(log, config))``.
    config: the list protocol.

  Returns:
    Train / valid / test lists (split by the time of each list's first row) with the
    preparation report: counts, positives per list, lists without a positive, and
    the AUC of the raw retriever score against the labels per split.
  """
  config.validate()
  start = retriever_cutoff(log, config)
  build = _BUILDERS[config.protocol]
  users, first_row, items, scores, labels, mask = build(log, params, start, config)
  short = mask.sum(1) < config.min_list_size
  if config.protocol == "exposure" and short.any():
    keep = ~short
    users, first_row, items, scores, labels, mask = (
        a[keep] for a in (users, first_row, items, scores, labels, mask))
  dropped = int(short.sum()) if config.protocol == "exposure" else 0
  if len(users) == 0:
    raise ValueError(f"no {config.protocol} list could be built from rows {start}.. of "
                     f"{log.name!r}")
  items, scores, labels, mask = _sort_by_score(items, scores, labels, mask)
  history, hmask = _histories(log, users, first_row, config.history_size)
  order = np.argsort(first_row, kind="stable")
  n_lists = len(order)
  n_test = max(1, int(round(n_lists * config.test_fraction)))
  n_valid = max(1, int(round(n_lists * config.valid_fraction)))
  bounds = {"train": order[:n_lists - n_valid - n_test],
            "valid": order[n_lists - n_valid - n_test:n_lists - n_test],
            "test": order[n_lists - n_test:]}
  user_features = log.user_features[users]
  item_features = log.item_features[items]
  splits, report = {}, {"protocol": config.protocol, "retriever_rows": start,
                        "list_rows": log.num_rows - start,
                        "short_lists_dropped": dropped}
  for name, idx in bounds.items():
    split = {"user": users[idx].astype(np.int32), "history": history[idx],
             "history_mask": hmask[idx], "items": items[idx], "scores": scores[idx],
             "labels": labels[idx], "mask": mask[idx],
             "user_features": user_features[idx], "item_features": item_features[idx]}
    splits[name] = split
    pos = (split["labels"] * split["mask"]).sum(1)
    report[name] = {
        "lists": int(len(idx)), "candidates": int(split["mask"].sum()),
        "positives_per_list": float(pos.mean()) if len(idx) else 0.0,
        "lists_without_positive": int((pos == 0).sum()),
        "raw_score_auc": float(metrics.global_auc(
            jnp.asarray(split["scores"]), jnp.asarray(split["labels"]),
            jnp.asarray(split["mask"]))),
    }
    logging.info("%s lists: %s", name, report[name])
  return types.PreparedLists(
      splits=splits, num_items=log.num_items, num_users=log.num_users,
      user_feature_vocab=log.user_feature_vocab,
      item_feature_vocab=log.item_feature_vocab, report=report,
      name=f"{log.name} ({config.protocol} lists)", is_real=log.is_real)
