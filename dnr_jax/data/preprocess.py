"""Preprocessing of interaction logs: the paper's k-core filter, with dense re-indexing.

The paper drops users and items with fewer than 20 interactions. Dropping items can
push a user below the threshold and vice versa, so the filter is iterated until no
user or item falls below it (the k-core). Counts are over all rows of the log (all
impressions for KuaiRand, all ratings for MovieLens), not positives only: the filter
is about having enough data per id, whatever its label.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from dnr_jax.data import types


def _compact(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """New dense ids 1..K for the kept old ids (``keep[old]``), 0 elsewhere."""
  new = np.zeros(keep.shape[0], np.int32)
  new[keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
  return new[ids]


def k_core(log: types.Interactions, k: int, max_rounds: int = 100) -> types.Interactions:
  """Keeps the rows whose user and item both have >= ``k`` rows, iterated to a fixpoint.

  Ids are re-densified (users and items start at 1 again, in order of their old
  ids); the raw-id maps and feature tables follow, and the rows keep their order.

  Raises:
    ValueError: for ``k < 1``, or when nothing survives the filter.
  """
  if k < 1:
    raise ValueError(f"k_core k={k} must be >= 1")
  rows = np.ones(log.num_rows, bool)
  for rnd in range(max_rounds):
    u_count = np.bincount(log.user[rows], minlength=log.num_users)
    i_count = np.bincount(log.item[rows], minlength=log.num_items)
    ok = rows & (u_count[log.user] >= k) & (i_count[log.item] >= k)
    logging.info("k-core(%d) round %d: %d -> %d rows", k, rnd + 1, rows.sum(), ok.sum())
    if ok.sum() == rows.sum():
      break
    rows = ok
  if not rows.any():
    raise ValueError(f"no interaction survives the {k}-core filter of {log.name!r} "
                     f"({log.num_rows} rows); lower the threshold")
  keep_u = np.bincount(log.user[rows], minlength=log.num_users) > 0
  keep_i = np.bincount(log.item[rows], minlength=log.num_items) > 0
  keep_u[0] = keep_i[0] = False
  # Row 0 (padding) stays first in the id maps and feature tables.
  u_rows = np.concatenate([[0], np.flatnonzero(keep_u)])
  i_rows = np.concatenate([[0], np.flatnonzero(keep_i)])
  return dataclasses.replace(
      log,
      user=_compact(log.user[rows], keep_u), item=_compact(log.item[rows], keep_i),
      time=log.time[rows], label=log.label[rows],
      columns={c: v[rows] for c, v in log.columns.items()},
      user_raw_id=log.user_raw_id[u_rows], item_raw_id=log.item_raw_id[i_rows],
      user_features=log.user_features[u_rows], item_features=log.item_features[i_rows])
