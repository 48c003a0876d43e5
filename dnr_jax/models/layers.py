"""The parts every reranker backbone shares: input tokens, encoder blocks, the head.

``InputTokens`` builds one token per candidate from its item embedding, the user
state and the scores (``ModelConfig.score_usage``, the paper's "c / + / w score",
open point 3 in ``docs/paper.md``). With ``K`` score sets (``score_sets``
``[K, B, n]``) the item and user parts are computed once and only the score part is
per set; ``tile_sets`` and ``per_set`` move between the ``[K * B, ...]`` rows the
encoders see and the ``[K, B, n]`` logits callers get.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax.models import dropout as dropout_lib
from dnr_jax.models import tables


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer encoder block; padding masked out of attention."""
  hidden: int
  num_heads: int
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train,
        dtype=self.dtype)(h, h, mask=nn.make_attention_mask(mask, mask))
    x = x + dropout_lib.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.Dense(self.hidden, dtype=self.dtype)(
        nn.gelu(nn.Dense(2 * self.hidden, dtype=self.dtype)(h)))
    return x + dropout_lib.Dropout(self.dropout, deterministic=not train)(h)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``x`` ``[..., L, d]`` over the valid positions of ``mask`` ``[..., L]``."""
  w = mask[..., None].astype(x.dtype)
  return (x * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0)


def compute_dtype(config: config_lib.ModelConfig) -> jnp.dtype:
  """The activations' dtype (``ModelConfig.compute_dtype``)."""
  if config.compute_dtype not in config_lib.COMPUTE_DTYPES:
    raise ValueError(f"model.compute_dtype={config.compute_dtype!r} is not one of "
                     f"{list(config_lib.COMPUTE_DTYPES)}")
  return jnp.dtype(config.compute_dtype)


def score_sets_of(batch: batch_lib.ListBatch, score_sets) -> jax.Array:
  """``[K, B, n]`` score sets: ``batch.scores`` alone (K = 1) unless given."""
  return batch.scores[None] if score_sets is None else score_sets


def tile_sets(x: jax.Array, k: int) -> jax.Array:
  """``x`` ``[B, ...]`` repeated for ``k`` score sets, set-major: ``[k * B, ...]``."""
  return x if k == 1 else jnp.concatenate([x] * k, axis=0)


def per_set(logits: jax.Array, score_sets) -> jax.Array:
  """``[K * B, n]`` logits back to ``[K, B, n]`` (``[B, n]`` without score sets)."""
  logits = logits.astype(jnp.float32)
  if score_sets is None:
    return logits
  return logits.reshape(score_sets.shape[:2] + logits.shape[1:])


class InputTokens(nn.Module):
  """Candidate tokens ``[K * B, n, d]`` from item, user and ``K`` score inputs.

  * item: an item-id embedding plus one embedding per categorical item feature;
  * user: a Transformer over the history (item embeddings shared with the
    candidates, learned positions, padding masked), mean-pooled, plus user-id and
    user-feature embeddings; *added* to every candidate token, so attention over the
    list is personalised, as in PRM's personalised input;
  * scores (``score_usage``): ``concat`` joins a score embedding to the token and
    projects back to ``d``; ``add`` adds it; ``weight`` multiplies the item token by
    the scalar score, scaling the item's whole representation; ``none`` ignores the
    scores. The score embedding is an MLP on the scalar, not a bucket lookup, so the
    logits are differentiable in the scores.

  The item and user parts do not depend on the scores: with ``K`` score sets they are
  computed once (one history encoder pass) and only the score part is per set. The
  tokens of set ``k`` are rows ``k * B .. (k + 1) * B - 1``.

  ``table_shards > 1``: the item and user tables are this device's row shards
  (``models.tables``), for the step compiled with a ``'model'`` mesh axis.
  """
  config: config_lib.ModelConfig
  table_shards: int = 1

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool,
               score_sets=None) -> jax.Array:
    c = self.config
    d, dt = c.hidden, compute_dtype(c)
    scores = score_sets_of(batch, score_sets)                       # [K, B, n]
    item_embed = tables.Embed(c.num_items, d, name="item_embed", dtype=dt,
                              shards=self.table_shards)
    item = item_embed(batch.items)
    for j, vocab in enumerate(c.item_feature_vocab):
      item = item + nn.Embed(vocab, d, name=f"item_feature_{j}", dtype=dt)(
          batch.item_features[..., j])
    # User state from the history.
    hist = item_embed(batch.history)
    hist = hist + self.param("history_position", nn.initializers.normal(0.02),
                             (batch.history.shape[-1], d)).astype(dt)
    for i in range(c.history_layers):
      hist = EncoderBlock(d, c.num_heads, c.dropout, dtype=dt, name=f"history_{i}")(
          hist, batch.history_mask, train)
    user = masked_mean(hist, batch.history_mask)
    user = user + tables.Embed(c.num_users, d, name="user_embed", dtype=dt,
                               shards=self.table_shards)(batch.user)
    for j, vocab in enumerate(c.user_feature_vocab):
      user = user + nn.Embed(vocab, d, name=f"user_feature_{j}", dtype=dt)(
          batch.user_features[..., j])
    user = nn.Dense(d, name="user_proj", dtype=dt)(user)[:, None, :]
    if c.score_usage == "weight":
      tokens = item * scores[..., None].astype(dt) + user           # [K, B, n, d]
    else:
      tokens = jnp.broadcast_to(item + user, scores.shape + (d,))
    if c.score_usage in ("concat", "add"):
      s = nn.Dense(d, name="score_in", dtype=dt)(scores[..., None])
      s = nn.Dense(d, name="score_out", dtype=dt)(nn.gelu(s))
      if c.score_usage == "add":
        tokens = tokens + s
      else:
        tokens = nn.Dense(d, name="score_concat", dtype=dt)(
            jnp.concatenate([tokens, s], -1))
    tokens = tokens.reshape((-1,) + tokens.shape[2:])              # [K * B, n, d]
    return dropout_lib.Dropout(c.dropout, deterministic=not train)(tokens)


def head(x: jax.Array, hidden: int, dtype=jnp.float32) -> jax.Array:
  """The per-candidate MLP head: ``[..., d]`` tokens to ``[...]`` logits."""
  return nn.Dense(1, name="head_out", dtype=dtype)(
      nn.gelu(nn.Dense(hidden, name="head_in", dtype=dtype)(x)))[..., 0]
