"""Ranking metrics at any K, jittable and computed on device.

Conventions (open point 6 in ``docs/paper.md``, decided here):

* **Ranking.** Candidates are sorted by the reranker's logit, descending; ties are
  broken by retriever rank, i.e. by position in the list (candidates are stored in
  retriever rank order, see ``dnr_jax.batch``). Padded candidates rank after every
  valid one and never count.
* **Which lists count.** A list with no positive carries no ranking signal and is
  excluded from every per-list mean (``weight`` 0); per-list AUC also needs a
  negative (``auc_weight``). Lists are then averaged with equal weight.

Per-list formulas, with ``rel_i`` the label at rank ``i`` (1-based), ``P`` the list's
positives and ``hits = sum_{i<=K} rel_i``:

* ``hr`` = ``hits / max(K', P)`` with ``K' = min(K, #valid)``: the paper's hit ratio
  H@K (the tables' and logs' ``H@K``). With at most K positives (the paper's lists)
  it is ``hits / K``. Why not the binary hit or recall: in every row of the paper's
  Table 1 its H@6 is *below* its F1@6 (ML-1M PRM: H 60.09, F1 65.51; KuaiRand 39.92
  vs 46.18). A list's F1 lies between its precision and its recall, and the binary
  hit is at least both, so the paper's H can be neither the binary hit nor recall;
  ``hits / max(K, P)`` is at most precision, consistent with every row. Dividing by
  ``K'`` rather than K keeps a perfect ranking of a list shorter than K at 1, as
  ``precision`` does.
* ``hit_any`` = 1 if ``hits > 0`` else 0: the binary "some positive reaches the top
  K" (the tables' ``HR-any@K`` column; about 98% on the demo sample, so it says
  little).
* ``precision`` = ``hits / min(K, #valid)``; ``recall`` = ``hits / P``.
* ``f1`` = ``2 p r / (p + r)`` (0 when both are 0).
* ``ndcg`` = ``DCG / IDCG``, ``DCG = sum_{i<=K} rel_i / log2(i + 1)``, ``IDCG`` the DCG
  of the labels sorted descending.
* ``map`` = ``sum_{i<=K} rel_i * prec@i / norm``, with ``norm = min(P, K)``
  (``"min_pos_k"``, default) or ``norm = hits`` (``"hits"``, 0 when no hit).
* ``auc`` = the fraction of (positive, negative) valid pairs that the logits order
  correctly, ties counting 1/2.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

LIST_METRICS = ("hr", "hit_any", "precision", "recall", "f1", "ndcg", "map", "auc")


def rank_order(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Indices ``[B, n]`` that sort each list: logit descending, ties by position."""
  n = logits.shape[-1]
  pos = jnp.broadcast_to(jnp.arange(n), logits.shape)
  # lexsort sorts by the last key first: validity, then -logit, then position.
  return jnp.lexsort((pos, -logits, ~mask), axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "map_normaliser"))
def list_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array, *, k: int,
                 map_normaliser: str = "min_pos_k") -> dict[str, jax.Array]:
  """Per-list metrics at ``k`` (formulas in the module docstring).

  Args:
    logits: ``[B, n]`` reranker scores, higher is better.
    labels: ``[B, n]`` binary feedback.
    mask: ``[B, n]`` valid candidates.
    k: the cut-off K.
    map_normaliser: ``"min_pos_k"`` or ``"hits"``.

  Returns:
    ``LIST_METRICS`` names -> ``[B]`` values, plus ``weight`` (1 for lists with a
    positive) and ``auc_weight`` (1 for lists with a positive and a negative).
  """
  chex.assert_equal_shape([logits, labels, mask])
  if map_normaliser not in ("min_pos_k", "hits"):
    raise ValueError(f"map_normaliser={map_normaliser!r} is not 'min_pos_k' or 'hits'")
  b, n = logits.shape
  kk = min(k, n)
  labels = jnp.where(mask, labels, 0.0).astype(jnp.float32)
  order = rank_order(logits, mask)
  rel = jnp.take_along_axis(labels, order, -1)[:, :kk]            # [B, K]
  n_pos = labels.sum(-1)
  n_valid = mask.sum(-1).astype(jnp.float32)
  hits = rel.sum(-1)
  ranks = jnp.arange(1, kk + 1, dtype=jnp.float32)
  discount = 1.0 / jnp.log2(ranks + 1.0)
  dcg = (rel * discount).sum(-1)
  ideal = -jnp.sort(-labels, axis=-1)[:, :kk]
  idcg = (ideal * discount).sum(-1)
  precision = hits / jnp.maximum(jnp.minimum(float(kk), n_valid), 1.0)
  recall = hits / jnp.maximum(n_pos, 1.0)
  f1 = jnp.where(precision + recall > 0,
                 2 * precision * recall / jnp.maximum(precision + recall, 1e-12), 0.0)
  prec_at_i = jnp.cumsum(rel, -1) / ranks
  ap_sum = (rel * prec_at_i).sum(-1)
  norm = jnp.minimum(n_pos, float(kk)) if map_normaliser == "min_pos_k" else hits
  weight = (n_pos > 0).astype(jnp.float32)
  out = {
      "hr": hits / jnp.maximum(jnp.maximum(jnp.minimum(float(kk), n_valid), n_pos),
                               1.0),
      "hit_any": (hits > 0).astype(jnp.float32),
      "precision": precision,
      "recall": recall,
      "f1": f1,
      "ndcg": dcg / jnp.maximum(idcg, 1e-12),
      "map": ap_sum / jnp.maximum(norm, 1.0),
      "auc": list_auc(logits, labels, mask),
      "weight": weight,
      "auc_weight": weight * (n_valid - n_pos > 0),
  }
  for v in out.values():
    chex.assert_shape(v, (b,))
  return out


def list_auc(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-list AUC ``[B]`` over valid (positive, negative) pairs, ties counting 1/2.

  O(n^2) per list, which for n = 50 is 2,500 comparisons: cheaper on an accelerator
  than a sort-based rank statistic.
  """
  pos = (labels > 0) & mask
  neg = (labels <= 0) & mask
  diff = logits[:, :, None] - logits[:, None, :]                   # [B, i, j]
  pair = pos[:, :, None] & neg[:, None, :]
  score = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
  n_pairs = pair.sum((1, 2))
  return jnp.where(n_pairs > 0, (score * pair).sum((1, 2)) / jnp.maximum(n_pairs, 1), 0.0)


@jax.jit
def weighted_sums(per_list: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of ``metric * weight`` over lists, and the weight sums, for aggregation.

  Sums add across batches and devices (``psum``); ``means`` turns them into means.
  """
  out = {"weight": per_list["weight"].sum(), "auc_weight": per_list["auc_weight"].sum(),
         "lists": jnp.asarray(per_list["weight"].shape[0], jnp.float32)}
  for name in LIST_METRICS:
    w = per_list["auc_weight"] if name == "auc" else per_list["weight"]
    out[name] = (per_list[name] * w).sum()
  return out


def means(sums: dict) -> dict[str, float]:
  """Per-list means from ``weighted_sums`` (summed over any number of batches)."""
  out = {}
  for name in LIST_METRICS:
    w = sums["auc_weight"] if name == "auc" else sums["weight"]
    out[name] = sums[name] / max(float(w), 1.0)
  out["lists_with_positive"] = sums["weight"]
  return out


@jax.jit
def global_auc(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """AUC over all valid candidates of all lists pooled (ties counting 1/2).

  Mann-Whitney U from mid-ranks: sort once, give tied values their average rank.
  """
  x = jnp.where(mask, logits, jnp.inf).reshape(-1)
  y = (jnp.where(mask, labels, 0.0) > 0).reshape(-1)
  valid = mask.reshape(-1)
  order = jnp.argsort(x)
  xs, ys, vs = x[order], y[order], valid[order]
  # Mid-rank of each tie group: mean of first and last 1-based index of its run.
  first = jnp.searchsorted(xs, xs, side="left").astype(jnp.float32) + 1
  last = jnp.searchsorted(xs, xs, side="right").astype(jnp.float32)
  midrank = jnp.where(vs, 0.5 * (first + last), 0.0)
  n_pos = (ys & vs).sum().astype(jnp.float32)
  n_neg = ((~ys) & vs).sum().astype(jnp.float32)
  u = jnp.where(ys & vs, midrank, 0.0).sum() - n_pos * (n_pos + 1) / 2
  return jnp.where((n_pos > 0) & (n_neg > 0), u / jnp.maximum(n_pos * n_neg, 1.0), 0.5)


@functools.partial(jax.jit, static_argnames=("k",))
def top_k_items(logits: jax.Array, mask: jax.Array, items: jax.Array, *,
                k: int) -> jax.Array:
  """The item ids each list shows in its top K, ``[B, min(K, n)]`` (0: no item)."""
  order = rank_order(logits, mask)[:, :min(k, logits.shape[-1])]
  top = jnp.take_along_axis(items, order, -1)
  return jnp.where(jnp.take_along_axis(mask, order, -1), top, 0)


@functools.partial(jax.jit, static_argnames=("k", "num_items"))
def coverage(logits: jax.Array, mask: jax.Array, items: jax.Array, *, k: int,
             num_items: int) -> jax.Array:
  """Fraction of the catalogue (ids ``1..num_items-1``) shown in some list's top K."""
  seen = jnp.zeros((num_items,), bool).at[top_k_items(logits, mask, items, k=k)].set(True)
  return seen[1:].sum() / max(num_items - 1, 1)


@functools.partial(jax.jit, static_argnames=("k", "map_normaliser"))
def list_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, *, k: int,
              map_normaliser: str = "min_pos_k") -> dict[str, jax.Array]:
  """``weighted_sums`` of ``list_metrics``: what batches of a split add up."""
  return weighted_sums(list_metrics(logits, labels, mask, k=k,
                                    map_normaliser=map_normaliser))


class Accumulator:
  """The metrics of one ranking, accumulated over chunks of lists (host side).

  Per-list means come from summed ``weighted_sums`` (given by the caller, e.g. from
  the devices' eval step, or computed here); the global AUC is exact, so every valid
  candidate's logit and label is kept (5 bytes a candidate); coverage keeps a bitmap
  of the items shown in some top K. The training loop, the retriever row and the
  reranking of files all report through this one class.

  Args:
    k: the K of the @K metrics.
    map_normaliser: see ``list_metrics``.
    num_items: catalogue size (ids ``1..num_items-1``), for coverage.
    batch_size: when the sums are computed here, lists per computation (fixed, so
      chunks of any size compile nothing new); None: the whole chunk at once.
  """

  def __init__(self, *, k: int, map_normaliser: str, num_items: int,
               batch_size: int | None = None):
    self.k, self.map_normaliser, self.num_items = k, map_normaliser, num_items
    self.batch_size = batch_size
    self._sums = None
    self._logits: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []
    self._seen = np.zeros(num_items, bool)

  def _sums_of(self, logits, labels, mask) -> dict:
    n = len(logits)
    step = self.batch_size or max(n, 1)
    sums = None
    for i in range(0, n, step):
      part = [x[i:i + step] for x in (logits, labels, mask)]
      pad = step - len(part[0])
      if pad and self.batch_size:   # padding lists: mask False, they count nothing
        part = [np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
                for x in part]
      s = jax.device_get(list_sums(*part, k=self.k, map_normaliser=self.map_normaliser))
      sums = s if sums is None else jax.tree.map(np.add, sums, s)
    return sums

  def add(self, logits, labels, mask, items, sums: dict | None = None) -> None:
    """Adds a chunk of lists: ``[B, n]`` logits, labels, mask and item ids.

    ``sums``: this chunk's ``weighted_sums`` if already computed (else computed).
    """
    logits = np.asarray(logits, np.float32)
    labels, mask = np.asarray(labels, np.float32), np.asarray(mask, bool)
    if sums is None:
      sums = self._sums_of(logits, labels, mask)
    sums = jax.device_get(sums)
    self._sums = sums if self._sums is None else jax.tree.map(np.add, self._sums, sums)
    self._logits.append(logits[mask])
    self._labels.append(labels[mask] > 0)
    top = np.asarray(top_k_items(logits, mask, np.asarray(items), k=self.k))
    self._seen[top[top < self.num_items]] = True

  def results(self) -> dict[str, float]:
    """The per-list means (``means``), ``global_auc`` and ``coverage``."""
    if self._sums is None:
      raise ValueError("Accumulator.results() before any chunk was added")
    out = {k: float(v) for k, v in means(self._sums).items()}
    labels = np.concatenate(self._labels)[None]
    out["global_auc"] = float(global_auc(np.concatenate(self._logits)[None], labels,
                                         np.ones_like(labels)))
    out["coverage"] = float(self._seen[1:].sum() / max(self.num_items - 1, 1))
    return out
