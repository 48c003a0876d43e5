"""Rerankers ``q_theta(z | x)``: PRM, SetRank, DLCM and PIER behind one interface.

``make_reranker(config)`` returns a Flax module used as::

  logits = module.apply({"params": theta}, batch, train=..., rngs={"dropout": key})

with ``logits`` ``[B, n]``. The retriever scores are read from ``batch.scores`` (the
train step swaps in generated scores with ``batch.replace(scores=x_prime)``), and
the model is differentiable in them: the generator is trained through it (L_adv).

``module.apply(..., score_sets=s)`` with ``s`` ``[K, B, n]`` scores the same lists
under ``K`` score vectors at once and returns ``[K, B, n]``: the user state (the
history encoder) and the item tokens are computed once and shared, and the list
encoder runs on the ``K * B`` lists in one pass. The train step scores the real and
the generated scores of a batch this way (``L_direct`` and ``L_z``).

``ModelConfig.compute_dtype="bfloat16"`` runs activations and matmuls in bfloat16
(parameters stay float32; the logits are returned in float32).

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
from dnr_jax import dropout as dropout_lib


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


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  w = mask[..., None].astype(x.dtype)
  return (x * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0)


def compute_dtype(config: config_lib.ModelConfig) -> jnp.dtype:
  """The activations' dtype (``ModelConfig.compute_dtype``)."""
  if config.compute_dtype not in config_lib.COMPUTE_DTYPES:
    raise ValueError(f"model.compute_dtype={config.compute_dtype!r} is not one of "
                     f"{list(config_lib.COMPUTE_DTYPES)}")
  return jnp.dtype(config.compute_dtype)


def _score_sets(batch: batch_lib.ListBatch, score_sets) -> jax.Array:
  """``[K, B, n]`` score sets: ``batch.scores`` alone (K = 1) unless given."""
  return batch.scores[None] if score_sets is None else score_sets


def _tile_sets(x: jax.Array, k: int) -> jax.Array:
  """``x`` ``[B, ...]`` repeated for ``k`` score sets, set-major: ``[k * B, ...]``."""
  return x if k == 1 else jnp.concatenate([x] * k, axis=0)


def _per_set(logits: jax.Array, score_sets) -> jax.Array:
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
  """
  config: config_lib.ModelConfig

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool,
               score_sets=None) -> jax.Array:
    c = self.config
    d, dt = c.hidden, compute_dtype(c)
    scores = _score_sets(batch, score_sets)                       # [K, B, n]
    item_embed = nn.Embed(c.num_items, d, name="item_embed", dtype=dt)
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
    user = _masked_mean(hist, batch.history_mask)
    user = user + nn.Embed(c.num_users, d, name="user_embed", dtype=dt)(batch.user)
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


def _head(x: jax.Array, hidden: int, dtype=jnp.float32) -> jax.Array:
  return nn.Dense(1, name="head_out", dtype=dtype)(
      nn.gelu(nn.Dense(hidden, name="head_in", dtype=dtype)(x)))[..., 0]


class PRM(nn.Module):
  """Personalized Re-ranking Model: a Transformer over the list with positions.

  Tokens (``InputTokens``) plus a learned embedding of the retriever rank (the
  position: candidates are stored in retriever order), then ``num_layers`` encoder
  blocks over the list, then a per-item MLP head.
  """
  config: config_lib.ModelConfig

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False,
               score_sets=None) -> jax.Array:
    c = self.config
    dt = compute_dtype(c)
    x = InputTokens(c, name="tokens")(batch, train, score_sets)
    mask = _tile_sets(batch.mask, x.shape[0] // batch.mask.shape[0])
    x = x + self.param("rank_position", nn.initializers.normal(0.02),
                       (batch.items.shape[-1], c.hidden)).astype(dt)
    for i in range(c.num_layers):
      x = EncoderBlock(c.hidden, c.num_heads, c.dropout, dtype=dt, name=f"list_{i}")(
          x, mask, train)
    return _per_set(_head(nn.LayerNorm(dtype=dt)(x), c.hidden, dt), score_sets)


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
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False,
               score_sets=None) -> jax.Array:
    c = self.config
    dt = compute_dtype(c)
    x = InputTokens(c, name="tokens")(batch, train, score_sets)
    b = x.shape[0]
    mask = _tile_sets(batch.mask, b // batch.mask.shape[0])
    inducing = self.param("inducing", nn.initializers.normal(0.02),
                          (self.num_inducing, c.hidden)).astype(dt)
    q = jnp.broadcast_to(inducing, (b,) + inducing.shape)
    ind_mask = jnp.ones((b, self.num_inducing), bool)
    h = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, name="induce", dtype=dt)(
        q, x, mask=nn.make_attention_mask(ind_mask, mask))
    y = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, name="broadcast",
                                        dtype=dt)(
        nn.LayerNorm(dtype=dt)(x), h, mask=nn.make_attention_mask(mask, ind_mask))
    x = x + dropout_lib.Dropout(c.dropout, deterministic=not train)(y)
    for i in range(c.num_layers):
      x = EncoderBlock(c.hidden, c.num_heads, c.dropout, dtype=dt, name=f"set_{i}")(
          x, mask, train)
    return _per_set(_head(nn.LayerNorm(dtype=dt)(x), c.hidden, dt), score_sets)


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
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False,
               score_sets=None) -> jax.Array:
    c = self.config
    dt = compute_dtype(c)
    x = InputTokens(c, name="tokens")(batch, train, score_sets)
    mask = _tile_sets(batch.mask, x.shape[0] // batch.mask.shape[0])
    lengths = mask.sum(-1).astype(jnp.int32)
    # Valid candidates are a prefix of the list (padding at the end), so reversing
    # the first `lengths` steps reads them from last to first.
    carry, out = nn.RNN(nn.GRUCell(c.hidden, dtype=dt), reverse=True, keep_order=True,
                        return_carry=True, name="gru")(x, seq_lengths=lengths)
    s = jnp.broadcast_to(carry[:, None, :], out.shape)
    h = jnp.concatenate([out, s, out * s], -1)
    h = dropout_lib.Dropout(c.dropout, deterministic=not train)(h)
    return _per_set(_head(h, c.hidden, dt), score_sets)


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


