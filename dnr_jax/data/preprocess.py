"""Preprocessing of interaction logs: the paper's k-core filter, with dense re-indexing.

The paper drops users and items with fewer than 20 interactions. Dropping items can
push a user below the threshold and vice versa, so the filter is iterated until no
user or item falls below it (the k-core). Counts are over all rows of the log (all
impressions for KuaiRand, all ratings for MovieLens), not positives only: the filter
is about having enough data per id, whatever its label.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
from absl import logging

from dnr_jax.data import types
from dnr_jax.errors import DataError
from dnr_jax.errors import ConfigError


def _compact(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """New dense ids 1..K for the kept old ids (``keep[old]``), 0 elsewhere."""
  new = np.zeros(keep.shape[0], np.int32)
  new[keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
  return new[ids]


CountFn = Callable[[Optional[np.ndarray], Optional[np.ndarray]],
                   tuple[np.ndarray, np.ndarray]]


def k_core_ids(count: CountFn, k: int, name: str = "log", max_rounds: int = 100
               ) -> tuple[np.ndarray, np.ndarray]:
  """The ids of the k-core, from repeated counting passes over a log.

  Args:
    count: ``count(keep_user, keep_item) -> (rows per user id, rows per item id)``
      over the rows whose user and item are both kept (boolean masks indexed by id;
      ``None`` keeps every id). A pass over an in-memory log or over a stream of
      blocks (``dnr_jax.data.stream``): the filter itself never holds the log.
    k: the threshold.
    name: for messages.
    max_rounds: a safety bound on the passes (the k-core converges far sooner).

  Returns:
    ``(keep_user, keep_item)``: boolean masks over ids, True for the ids of the rows
    that survive, i.e. whose user and item both have >= ``k`` surviving rows.

  Raises:
    ValueError: for ``k < 1``, or when nothing survives the filter.
  """
  if k < 1:
    raise ConfigError(f"k_core k={k} must be >= 1")
  keep_u = keep_i = None
  for rnd in range(max_rounds):
    cu, ci = count(keep_u, keep_i)
    rows = int(cu.sum())
    # A fixpoint when no counted row has an id below the threshold.
    if not ((cu > 0) & (cu < k)).any() and not ((ci > 0) & (ci < k)).any():
      logging.info("k-core(%d) of %s: %d rows after %d pass(es)", k, name, rows,
                   rnd + 1)
      keep_u, keep_i = cu > 0, ci > 0
      break
    keep_u, keep_i = cu >= k, ci >= k
    logging.info("k-core(%d) of %s, pass %d: %d rows counted, %d users and %d items "
                 "stay", k, name, rnd + 1, rows, keep_u.sum(), keep_i.sum())
  else:
    raise ValueError(f"the {k}-core of {name} did not converge in {max_rounds} passes")
  if not keep_u.any():
    raise DataError(f"no interaction survives the {k}-core filter of {name!r}; lower "
                    "the threshold")
  return keep_u, keep_i


def keep_mask(keep: Optional[np.ndarray], ids: np.ndarray) -> np.ndarray:
  """``keep[ids]`` (all True for ``keep=None``)."""
  return np.ones(len(ids), bool) if keep is None else keep[ids]


def k_core(log: types.Interactions, k: int, max_rounds: int = 100) -> types.Interactions:
  """Keeps the rows whose user and item both have >= ``k`` rows, iterated to a fixpoint.

  Ids are re-densified (users and items start at 1 again, in order of their old
  ids); the raw-id maps and feature tables follow, and the rows keep their order.

  Raises:
    ValueError: for ``k < 1``, or when nothing survives the filter.
  """
  def count(keep_u, keep_i):
    rows = keep_mask(keep_u, log.user) & keep_mask(keep_i, log.item)
    return (np.bincount(log.user[rows], minlength=log.num_users),
            np.bincount(log.item[rows], minlength=log.num_items))

  keep_u, keep_i = k_core_ids(count, k, log.name, max_rounds)
  rows = keep_u[log.user] & keep_i[log.item]
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
