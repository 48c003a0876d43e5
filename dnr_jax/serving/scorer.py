"""Scores lists with a bundle's reranker on every local device, and ranks them.

``Scorer`` runs the training loop's own compiled eval program
(``runtime.runner.Runner.evaluate_params``), so its logits are bit-identical to the
ones the run was evaluated with. ``rerank`` turns logits into ranks with the
project's tie rule (ties by upstream position, ``metrics.rank_order``).
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dnr_jax.runtime import pipeline
from dnr_jax.runtime import runner as runner_lib
from dnr_jax.serving.bundle import Bundle


class Scorer:
  """Scores lists with a bundle's reranker on every local device.

  Uses the training loop's compiled eval program (``Runner.evaluate_params``) on
  batches of ``batch_size`` lists (the run's evaluation batch by default), the last
  one padded with empty lists, so one shape compiles once and the logits are those
  the run was evaluated with.
  """

  def __init__(self, bundle: Bundle, *, devices: Optional[tuple] = None,
               batch_size: Optional[int] = None):
    self.config = bundle.config
    self.runner = runner_lib.Runner(self.config, devices or ())
    d = self.runner.num_devices
    bs = batch_size or self.config.eval_batch_size or self.config.global_batch_size
    # A serving machine may have another device count than training had.
    self.batch_size = -(-bs // d) * d
    self.params = self.runner.put_state(jax.tree.map(jnp.asarray, bundle.params))

  def score(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Logits ``[N, n]`` of ``arrays`` (``batch.FIELDS``) and the metric sums.

    The sums are ``metrics.weighted_sums`` over the lists (meaningful when labels
    are present), for ``metrics.Accumulator``.
    """
    arrays = pipeline.complete(arrays)
    n = pipeline.num_lists(arrays)
    sums, logits = None, []
    for b in pipeline.prefetch(pipeline.batches(arrays, self.batch_size, shuffle=False),
                               size=2, transform=self.runner.put_batch):
      s, lg = self.runner.evaluate_params(self.params, b)
      sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
      logits.append(lg)
    if not logits:
      return np.zeros(arrays["items"].shape, np.float32), {}
    return (np.asarray(jax.device_get(jnp.concatenate(logits)))[:n],
            jax.device_get(sums))


def score_lists(bundle: Bundle, arrays: Mapping[str, np.ndarray], *,
                devices: Optional[tuple] = None,
                batch_size: Optional[int] = None) -> np.ndarray:
  """The reranker's logits ``[N, n]`` for the lists ``arrays`` (higher = better).

  Padded candidates get a logit too; mask them (``rerank`` does). Bit-identical to
  the training run's eval logits with the same devices and batch size (other
  per-device shapes may round differently, by float epsilons).
  """
  return Scorer(bundle, devices=devices, batch_size=batch_size).score(arrays)[0]


def rerank_order(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Positions ``[N, n]`` in the new order: the candidates by logit descending,
  ties by upstream position, then the padded ones."""
  logits, mask = np.asarray(logits), np.asarray(mask, bool)
  pos = np.broadcast_to(np.arange(logits.shape[-1]), logits.shape)
  return np.lexsort((pos, -logits, ~mask), axis=-1)


def rerank(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """New 1-based ranks ``[N, n]``: logit descending, ties by upstream position.

  The order of ``metrics.rank_order`` (the metrics' own), computed on the host;
  padded candidates get rank 0.
  """
  mask = np.asarray(mask, bool)
  n = mask.shape[-1]
  order = rerank_order(logits, mask)
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1, n + 1), order.shape),
                    -1)
  return np.where(mask, ranks, 0).astype(np.int32)
