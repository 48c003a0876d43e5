"""Listwise backbones: PRM, SetRank and DLCM, on the shared input tokens."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax.models import dropout as dropout_lib
from dnr_jax.models.layers import (EncoderBlock, InputTokens, compute_dtype, head,
                                   per_set, tile_sets)


class PRM(nn.Module):
  """Personalized Re-ranking Model: a Transformer over the list with positions.

  Tokens (``InputTokens``) plus a learned embedding of the retriever rank (the
  position: candidates are stored in retriever order), then ``num_layers`` encoder
  blocks over the list, then a per-item MLP head.
  """
  config: config_lib.ModelConfig
  table_shards: int = 1

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False,
               score_sets=None) -> jax.Array:
    c = self.config
    dt = compute_dtype(c)
    x = InputTokens(c, self.table_shards, name="tokens")(batch, train, score_sets)
    mask = tile_sets(batch.mask, x.shape[0] // batch.mask.shape[0])
    x = x + self.param("rank_position", nn.initializers.normal(0.02),
                       (batch.items.shape[-1], c.hidden)).astype(dt)
    for i in range(c.num_layers):
      x = EncoderBlock(c.hidden, c.num_heads, c.dropout, dtype=dt, name=f"list_{i}")(
          x, mask, train)
    return per_set(head(nn.LayerNorm(dtype=dt)(x), c.hidden, dt), score_sets)


class SetRank(nn.Module):
  """SetRank: permutation-equivariant attention over the candidate *set*.

  No position embedding, by design: SetRank scores a set, so permuting the valid
  candidates permutes the logits and nothing else (the retriever's order still
  reaches the model through the scores, unless ``score_usage="none"``). An induced
  multi-head attention block (learned inducing points summarise the set) is
  followed by ``num_layers`` self-attention blocks.
  """
  config: config_lib.ModelConfig
  table_shards: int = 1
  num_inducing: int = 8

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False,
               score_sets=None) -> jax.Array:
    c = self.config
    dt = compute_dtype(c)
    x = InputTokens(c, self.table_shards, name="tokens")(batch, train, score_sets)
    b = x.shape[0]
    mask = tile_sets(batch.mask, b // batch.mask.shape[0])
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
    return per_set(head(nn.LayerNorm(dtype=dt)(x), c.hidden, dt), score_sets)


class DLCM(nn.Module):
  """Deep Listwise Context Model: a GRU reads the list, a local context scores it.

  The GRU reads the valid candidates in *reverse* retriever order, so the top
  retrieved item is read last and weighs most in the final state ``s`` (the local
  context); padding is excluded through the sequence lengths. Each candidate is
  scored from its GRU output ``o_i`` and ``s`` with an MLP on
  ``[o_i, s, o_i * s]``, DLCM's local ranking function in MLP form.

  ``unroll=True`` runs the GRU as ``n`` unrolled steps of the same cell instead of
  flax's scan (``nn.RNN``): the same parameters and the same logits
  (``tests/models_test.py``), for graph exporters that cannot trace flax's lifted
  scan (jax2onnx, ``serving/onnx_export.py``). Training keeps the scan, which
  compiles one step body whatever ``n``.
  """
  config: config_lib.ModelConfig
  table_shards: int = 1
  unroll: bool = False

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False,
               score_sets=None) -> jax.Array:
    c = self.config
    dt = compute_dtype(c)
    x = InputTokens(c, self.table_shards, name="tokens")(batch, train, score_sets)
    mask = tile_sets(batch.mask, x.shape[0] // batch.mask.shape[0])
    lengths = mask.sum(-1).astype(jnp.int32)
    # Valid candidates are a prefix of the list (padding at the end), so reversing
    # the first `lengths` steps reads them from last to first.
    cell = nn.GRUCell(c.hidden, dtype=dt)
    if self.unroll:
      carry, out = _reverse_gru_unrolled(cell, x, lengths)
    else:
      carry, out = nn.RNN(cell, reverse=True, keep_order=True, return_carry=True,
                          name="gru")(x, seq_lengths=lengths)
    s = jnp.broadcast_to(carry[:, None, :], out.shape)
    h = jnp.concatenate([out, s, out * s], -1)
    h = dropout_lib.Dropout(c.dropout, deterministic=not train)(h)
    return per_set(head(h, c.hidden, dt), score_sets)


def _reverse_gru_unrolled(cell: nn.GRUCell, x: jax.Array,
                          lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``nn.RNN(cell, reverse=True, keep_order=True, return_carry=True)``, unrolled.

  Step for step what flax's RNN does with ``seq_lengths``: each list's valid prefix
  flipped (padding stays last, reversed, as ``flax.linen.recurrent.flip_sequences``
  does), the cell over every position from the cell's zero carry, the carry after
  the last valid step (``lengths - 1``, wrapping to the last step for an empty list,
  as flax's indexing does), the outputs flipped back. Written with ``where`` rather
  than flax's integer ``%``, which jax2onnx cannot lower with a symbolic batch.
  """
  n = x.shape[1]
  t = jnp.arange(n)[None, :]
  length = lengths[:, None]
  # flip_sequences' index (n - 1 - t + L) % n, for 0 <= L <= n.
  flip = jnp.where(t < length, length - 1 - t, n + length - 1 - t)[..., None]
  xs = jnp.take_along_axis(x, flip, axis=1)
  carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
  carries, outs = [], []
  for step in range(n):
    carry, y = cell(carry, xs[:, step])
    carries.append(carry)
    outs.append(y)
  last = jnp.where(lengths > 0, lengths - 1, n - 1)[:, None, None]
  carry = jnp.take_along_axis(jnp.stack(carries, 1), last, axis=1)[:, 0]
  return carry, jnp.take_along_axis(jnp.stack(outs, 1), flip, axis=1)
