"""Embedding tables split by rows over the ``'model'`` mesh axis.

The item and user tables (the reranker's and the generator's) grow with the
catalogue: at hidden 128 in fp32 a 32M-row table is 16.4 GB, three times that with
Adam's moments. With ``TrainConfig.model_parallel = M > 1`` each of the ``M``
devices of a ``'model'`` group holds ``ceil(rows / M)`` consecutive rows of each
such table (and of its optimiser moments); everything else stays replicated.

The lookup inside the compiled step (``take``) is the standard pattern: the ids of
the group's ``M`` batch shards are gathered over ``'model'`` (``all_gather``, ids
only), each device reads the rows it owns (zeros elsewhere), and a reduce-scatter
over ``'model'`` (``psum_scatter``) sums the ``M`` partial lookups and hands each
device the embeddings of its own ids. Exactly one device contributes a non-zero
row per id, so the forward values equal a replicated lookup bit for bit. Its
transpose is the same pattern backwards: the cotangents are gathered over
``'model'`` and scattered into the owned rows, so a table shard's gradient is the
sum over its group's devices of their local gradients (``step`` averages it over
``'batch'`` and divides by ``M``).

A table whose row count ``M`` does not divide is padded with zero rows at the end
(``padded_rows``); no id reaches them, so their gradients, moments and
decoupled weight decay stay zero, and ``runtime.runner.Runner`` strips them when
it gathers the table to the host.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MODEL_AXIS = "model"
# Module names of the row-sharded tables (in ``InputTokens`` and ``ScoreGenerator``);
# a leaf ``.../<name>/embedding`` of the parameters or of an optimiser state
# mirroring them is split by rows.
ROW_SHARDED = ("item_embed", "user_embed")


def rows_per_shard(rows: int, shards: int) -> int:
  """Rows each of ``shards`` devices holds of a table of ``rows`` rows."""
  return -(-rows // shards)


def padded_rows(rows: int, shards: int) -> int:
  """The table's row count once padded to a multiple of ``shards``."""
  return rows_per_shard(rows, shards) * shards


def _key_names(path: Sequence[Any]) -> list[str]:
  names = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", None))
    if isinstance(name, str):
      names.append(name)
  return names


def table_name(path: Sequence[Any]) -> str | None:
  """``"item_embed"`` / ``"user_embed"`` if the leaf at ``path`` is a row-sharded
  table (a parameter or an optimiser moment of one), else None."""
  names = _key_names(path)
  if len(names) >= 2 and names[-1] == "embedding" and names[-2] in ROW_SHARDED:
    return names[-2]
  return None


def take(table: jax.Array, ids: jax.Array, shards: int) -> jax.Array:
  """``table[ids]`` where ``table`` is this device's ``[rows / shards, d]`` shard.

  ``shards == 1``: a plain gather. Otherwise it must run under a mesh with a
  ``'model'`` axis of size ``shards`` whose devices see different ids (see the
  module docstring). Ids are vocabulary ids, ``0 <= id < rows``: an id past the
  table reads zeros here where ``jnp.take`` would fill NaN.
  """
  if shards == 1:
    return jnp.take(table, ids, axis=0)
  rows = table.shape[0]
  first = jax.lax.axis_index(MODEL_AXIS) * rows
  local = jax.lax.all_gather(ids, MODEL_AXIS) - first           # [M, *ids.shape]
  owned = (local >= 0) & (local < rows)
  rows_read = jnp.take(table, jnp.where(owned, local, 0), axis=0)
  partial = jnp.where(owned[..., None], rows_read, jnp.zeros((), table.dtype))
  return jax.lax.psum_scatter(partial, MODEL_AXIS, scatter_dimension=0, tiled=False)


class Embed(nn.Embed):
  """``nn.Embed`` (same parameter, initialiser and dtype rules) split over ``shards``.

  With ``shards == 1`` it is ``nn.Embed``. With ``shards > 1`` its parameter is this
  device's shard, ``[ceil(num_embeddings / shards), features]``: the full table is
  created unsharded (``step.create_state``) and split by ``Runner.put_state``.
  """
  shards: int = 1

  def setup(self):
    if self.shards == 1:
      super().setup()
      return
    self.embedding = self.param(
        "embedding", self.embedding_init,
        (rows_per_shard(self.num_embeddings, self.shards), self.features),
        self.param_dtype)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.shards == 1:
      return super().__call__(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    return take(embedding, inputs, self.shards)
