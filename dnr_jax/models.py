"""Rerankers ``q_theta(z | x)``: PRM, SetRank, DLCM and PIER behind one interface.

``make_reranker(config)`` returns a Flax module used as::

  logits = module.apply({"params": theta}, batch, train=..., rngs={"dropout": key})

with ``logits`` ``[B, n]``. The retriever scores are read from ``batch.scores`` (the
train step swaps in generated scores with ``batch.replace(scores=x_prime)``), and
the model is differentiable in them: the generator is trained through it (L_adv).

PIER is in ``pier.py`` (built on this module's parts). All backbones share
``InputTokens``, which builds one token per candidate from its item embedding, the
user state and the scores (``ModelConfig.score_usage``, the paper's "c / + / w
score", open point 3).
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer encoder block; padding masked out of attention."""
  hidden: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train)(
            h, h, mask=nn.make_attention_mask(mask, mask))
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.hidden)(nn.gelu(nn.Dense(2 * self.hidden)(h)))
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  w = mask[..., None].astype(x.dtype)
  return (x * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0)


class InputTokens(nn.Module):
  """Candidate tokens ``[B, n, d]`` from item, user and score inputs.

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
  """
  config: config_lib.ModelConfig

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool) -> jax.Array:
    c = self.config
    d = c.hidden
    item_embed = nn.Embed(c.num_items, d, name="item_embed")
    item = item_embed(batch.items)
    for j, vocab in enumerate(c.item_feature_vocab):
      item = item + nn.Embed(vocab, d, name=f"item_feature_{j}")(
          batch.item_features[..., j])
    if c.score_usage == "weight":
      item = item * batch.scores[..., None]
    # User state from the history.
    hist = item_embed(batch.history)
    hist = hist + self.param("history_position", nn.initializers.normal(0.02),
                             (batch.history.shape[-1], d))
    for i in range(c.history_layers):
      hist = EncoderBlock(d, c.num_heads, c.dropout, name=f"history_{i}")(
          hist, batch.history_mask, train)
    user = _masked_mean(hist, batch.history_mask)
    user = user + nn.Embed(c.num_users, d, name="user_embed")(batch.user)
    for j, vocab in enumerate(c.user_feature_vocab):
      user = user + nn.Embed(vocab, d, name=f"user_feature_{j}")(
          batch.user_features[..., j])
    tokens = item + nn.Dense(d, name="user_proj")(user)[:, None, :]
    if c.score_usage in ("concat", "add"):
      s = nn.Dense(d, name="score_in")(batch.scores[..., None])
      s = nn.Dense(d, name="score_out")(nn.gelu(s))
      if c.score_usage == "add":
        tokens = tokens + s
      else:
        tokens = nn.Dense(d, name="score_concat")(jnp.concatenate([tokens, s], -1))
    return nn.Dropout(c.dropout, deterministic=not train)(tokens)


def _head(x: jax.Array, hidden: int) -> jax.Array:
  return nn.Dense(1, name="head_out")(nn.gelu(nn.Dense(hidden, name="head_in")(x)))[..., 0]


class PRM(nn.Module):
  """Personalized Re-ranking Model: a Transformer over the list with positions.

  Tokens (``InputTokens``) plus a learned embedding of the retriever rank (the
  position: candidates are stored in retriever order), then ``num_layers`` encoder
  blocks over the list, then a per-item MLP head.
  """
  config: config_lib.ModelConfig

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False) -> jax.Array:
    c = self.config
    x = InputTokens(c, name="tokens")(batch, train)
    x = x + self.param("rank_position", nn.initializers.normal(0.02),
                       (batch.items.shape[-1], c.hidden))
    for i in range(c.num_layers):
      x = EncoderBlock(c.hidden, c.num_heads, c.dropout, name=f"list_{i}")(
          x, batch.mask, train)
    return _head(nn.LayerNorm()(x), c.hidden)


class SetRank(nn.Module):
  """SetRank: permutation-equivariant attention over the candidate *set*.

  No position embedding, by design: SetRank scores a set, so permuting the valid
  candidates permutes the logits and nothing else (the retriever's order still
  reaches the model through the scores, unless ``score_usage="none"``). An induced
  multi-head attention block (learned inducing points summarise the set) is
  followed by ``num_layers`` self-attention blocks.
  """
  config: config_lib.ModelConfig
  num_inducing: int = 8

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False) -> jax.Array:
    c = self.config
    x = InputTokens(c, name="tokens")(batch, train)
    b = x.shape[0]
    inducing = self.param("inducing", nn.initializers.normal(0.02),
                          (self.num_inducing, c.hidden))
    q = jnp.broadcast_to(inducing, (b,) + inducing.shape)
    ind_mask = jnp.ones((b, self.num_inducing), bool)
    h = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, name="induce")(
        q, x, mask=nn.make_attention_mask(ind_mask, batch.mask))
    y = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, name="broadcast")(
        nn.LayerNorm()(x), h, mask=nn.make_attention_mask(batch.mask, ind_mask))
    x = x + nn.Dropout(c.dropout, deterministic=not train)(y)
    for i in range(c.num_layers):
      x = EncoderBlock(c.hidden, c.num_heads, c.dropout, name=f"set_{i}")(
          x, batch.mask, train)
    return _head(nn.LayerNorm()(x), c.hidden)


class DLCM(nn.Module):
  """Deep Listwise Context Model: a GRU reads the list, a local context scores it.

  The GRU reads the valid candidates in *reverse* retriever order, so the top
  retrieved item is read last and weighs most in the final state ``s`` (the local
  context); padding is excluded through the sequence lengths. Each candidate is
  scored from its GRU output ``o_i`` and ``s`` with an MLP on
  ``[o_i, s, o_i * s]``, DLCM's local ranking function in MLP form.
  """
  config: config_lib.ModelConfig

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False) -> jax.Array:
    c = self.config
    x = InputTokens(c, name="tokens")(batch, train)
    lengths = batch.mask.sum(-1).astype(jnp.int32)
    # Valid candidates are a prefix of the list (padding at the end), so reversing
    # the first `lengths` steps reads them from last to first.
    carry, out = nn.RNN(nn.GRUCell(c.hidden), reverse=True, keep_order=True,
                        return_carry=True, name="gru")(x, seq_lengths=lengths)
    s = jnp.broadcast_to(carry[:, None, :], out.shape)
    h = jnp.concatenate([out, s, out * s], -1)
    h = nn.Dropout(c.dropout, deterministic=not train)(h)
    return _head(h, c.hidden)


_BACKBONES = {"prm": PRM, "setrank": SetRank, "dlcm": DLCM}


def make_reranker(config: config_lib.ModelConfig) -> nn.Module:
  """The reranker module of ``config.backbone``."""
  # PIER lives in its own module, built on this one's parts (InputTokens), so it is
  # imported here rather than at the top.
  from dnr_jax import pier  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  _BACKBONES.setdefault("pier", pier.PIER)
  if config.backbone not in _BACKBONES:
    raise ValueError(f"model.backbone={config.backbone!r} is not one of "
                     f"{sorted(_BACKBONES)}")
  if config.score_usage not in config_lib.SCORE_USAGES:
    raise ValueError(f"model.score_usage={config.score_usage!r} is not one of "
                     f"{list(config_lib.SCORE_USAGES)}")
  return _BACKBONES[config.backbone](config)


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


