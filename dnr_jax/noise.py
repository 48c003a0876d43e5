"""Noise generators ``f_phi``: synthetic retriever-like scores from the feedback ``z``.

Two kinds, as in the paper (section 2 of ``docs/paper.md``):

* Heuristic (no parameters): ``x' = (1 - lambda_c) z + lambda_c eps`` (**Eq. 4**), with
  ``eps`` Gaussian (DNR-G) or Beta(a, b) (DNR-B).
* Model-based: a 2-layer MLP conditioned on the request and on ``z`` that outputs the
  scores directly (``lambda_c`` is then 1). Used only in training, after the warm-up.

Generated scores are always 0 at padded candidates, like real ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax.models import tables


def heuristic_eps(key: jax.Array, shape: tuple[int, ...],
                  config: config_lib.NoiseConfig) -> jax.Array:
  """Draws the heuristic noise ``eps`` of Eq. 4: N(mean, std) or Beta(a, b)."""
  if config.heuristic == "gaussian":
    return config.gaussian_mean + config.gaussian_std * jax.random.normal(key, shape)
  if config.heuristic == "beta":
    return jax.random.beta(key, config.beta_a, config.beta_b, shape)
  raise ValueError(f"noise.heuristic={config.heuristic!r} is not one of "
                   f"{list(config_lib.HEURISTICS)}")


def mix(labels: jax.Array, eps: jax.Array, lambda_c: float, clip: bool) -> jax.Array:
  """Eq. 4: ``x' = (1 - lambda_c) * z + lambda_c * eps``, optionally clipped to [0, 1]."""
  x = (1.0 - lambda_c) * labels + lambda_c * eps
  return jnp.clip(x, 0.0, 1.0) if clip else x


def heuristic_scores(key: jax.Array, labels: jax.Array, mask: jax.Array,
                     config: config_lib.NoiseConfig) -> jax.Array:
  """Generated scores ``x'`` ``[B, n]`` from the heuristic generator (Eq. 4)."""
  eps = heuristic_eps(key, labels.shape, config)
  return jnp.where(mask, mix(labels, eps, config.lambda_c, config.clip), 0.0)


class ScoreGenerator(nn.Module):
  """The model-based generator ``f_phi(u, z)``: a 2-layer MLP, output in (0, 1).

  Per candidate its input is (open point 2 in ``docs/paper.md``) the concatenation of

  * a user state: mean of the history's item embeddings plus a user-id embedding (the
    generator has its own embeddings: the two players share no parameters, so each
    player's update touches only its own state);
  * the label ``z`` (the paper conditions on it: noise is label-dependent);
  * the candidate's item embedding (``generator_use_item``), so noise can depend on
    the item, as a real retriever's errors do;
  * a ``N(0, 1)`` draw of size ``generator_noise_dim`` from the ``'noise'`` RNG
    stream: without it the generator would be a deterministic function of ``(u, z)``
    and could not express a score *distribution*.

  A sigmoid squashes the output into (0, 1); the scores are used as they are (the
  paper treats ``lambda_c`` as 1 for this generator).
  """
  noise: config_lib.NoiseConfig
  num_items: int
  num_users: int
  table_shards: int = 1   # row shards of its item and user tables (models.tables)

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch) -> jax.Array:
    h = self.noise.generator_hidden
    item_embed = tables.Embed(self.num_items, h, name="item_embed",
                              shards=self.table_shards)
    hist = item_embed(batch.history)
    hmask = batch.history_mask[..., None].astype(hist.dtype)
    user = (hist * hmask).sum(-2) / jnp.maximum(hmask.sum(-2), 1.0)
    user = user + tables.Embed(self.num_users, h, name="user_embed",
                               shards=self.table_shards)(batch.user)
    b, n = batch.items.shape
    parts = [jnp.broadcast_to(user[:, None, :], (b, n, h)), batch.labels[..., None]]
    if self.noise.generator_use_item:
      parts.append(item_embed(batch.items))
    draw = jax.random.normal(self.make_rng("noise"),
                             (b, n, self.noise.generator_noise_dim))
    parts.append(draw)
    x = nn.Dense(h, name="hidden")(jnp.concatenate(parts, -1))
    x = nn.Dense(1, name="out")(nn.gelu(x))[..., 0]
    return jnp.where(batch.mask, nn.sigmoid(x), 0.0)


def generated_list(batch: batch_lib.ListBatch, scores: jax.Array,
                   sort: bool) -> batch_lib.ListBatch:
  """``batch`` with its retriever scores replaced by generated ones ``x'``.

  With ``sort`` the candidates are re-ordered by ``x'`` (descending, padding last,
  ties by the real order), every per-candidate field moving with them: the list then
  looks like one a retriever with scores ``x'`` would have handed over, which is
  what the ``dnr_jax.batch`` convention promises every reranker (position ``j`` is
  the ``j``-th ranked). Without it, the positions keep the real retriever's ranking
  beside scores that no longer follow it, and the position embedding carries the
  real scores' order into a loss that is meant to see only synthetic ones.

  The permutation is piecewise constant in ``x'``; gradients reach ``x'`` through the
  gathered values, so ``L_adv`` still trains the generator.
  """
  if not sort:
    return batch.replace(scores=scores)
  order = jnp.argsort(jnp.where(batch.mask, -jax.lax.stop_gradient(scores), jnp.inf),
                      axis=-1, stable=True)
  take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (
      a.ndim - order.ndim)), axis=order.ndim - 1)
  return batch.replace(items=take(batch.items), scores=take(scores),
                       labels=take(batch.labels), mask=take(batch.mask),
                       item_features=take(batch.item_features))


def make_generator(noise: config_lib.NoiseConfig, model: config_lib.ModelConfig,
                   table_shards: int = 1) -> ScoreGenerator:
  """The model generator; ``table_shards`` as in ``models.make_reranker``."""
  return ScoreGenerator(noise=noise, num_items=model.num_items,
                        num_users=model.num_users, table_shards=table_shards)
