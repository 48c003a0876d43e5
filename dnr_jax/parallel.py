"""How the step's values are combined across devices: the mesh axes, the gradient
mean, the global norm and the optimiser that clips by it.

The step runs on a ``'batch'`` mesh axis, or on ``('batch', 'model')`` when the
embedding tables are split by rows (``TrainConfig.model_parallel``,
``models.tables``). These functions are what differs between the two: which axes
the batch is split over, how a row-sharded table's gradient is averaged, and how
its squares enter the global norm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dnr_jax import config as config_lib
from dnr_jax.models import tables

AXIS = "batch"
MODEL_AXIS = tables.MODEL_AXIS


def data_axes(config: config_lib.TrainConfig):
  """The mesh axes the batch is split over: ``'batch'``, and ``'model'`` when the
  tables are sharded (each device of a ``'model'`` group takes its own lists)."""
  return AXIS if config.model_parallel == 1 else (AXIS, MODEL_AXIS)


def device_step_key(key: jax.Array, step: jax.Array, axes=AXIS) -> jax.Array:
  """This step's key on this device: ``fold_in(fold_in(key, step), axis_index)``.

  Without the device index every device would draw the same noise and dropout. The
  index over ``('batch', 'model')`` is the device's position in the batch split, so
  a device draws the same as the device of the 1-axis mesh that holds its lists.
  """
  return jax.random.fold_in(jax.random.fold_in(key, step), jax.lax.axis_index(axes))


def mean_grads(grads: Any, config: config_lib.TrainConfig) -> Any:
  """The gradient averaged over every device's lists (the data-parallel mean).

  A table shard's gradient already sums its ``'model'`` group's lookups (the
  transpose of ``tables.take``), so it is averaged over ``'batch'`` and divided by
  ``M``; every other gradient is averaged over all devices.
  """
  if config.model_parallel == 1:
    return jax.lax.pmean(grads, AXIS)
  m = config.model_parallel
  return jax.tree_util.tree_map_with_path(
      lambda path, g: (jax.lax.pmean(g, AXIS) / m if tables.table_name(path)
                       else jax.lax.pmean(g, (AXIS, MODEL_AXIS))), grads)


def global_norm(tree: Any, shards: int = 1) -> jax.Array:
  """The L2 norm of a pytree, as one dot product of its flattened leaves.

  Why not ``optax.tree.norm`` (a sum of per-leaf sums of squares): XLA's GPU compiler
  (jax 0.11.2 on an H200) rejects the model-phase step built with it at the paper's
  shapes ("Expected instruction to have shape equal to f32[], actual shape is
  f32[1]"); the same step with this form compiled and ran (benchmarks/gpu_check.py).
  The concatenation copies every leaf, the tables included: cheap at the paper's
  vocabularies (a few hundred thousand floats besides the tables), a copy of each
  table per norm with a large catalogue (0.5 GB at 1M items, hidden 128).

  ``shards > 1`` (inside the step on a ``'model'`` axis): the row-sharded tables'
  squares are summed over ``'model'``, so every device gets the whole tree's norm.
  Each table is its own dot product: a concatenation would copy the tables, which
  are what the sharding keeps small.
  """
  if shards == 1:
    return jnp.sqrt(_sum_squares(jax.tree.leaves(tree)))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sharded = [x for path, x in flat if tables.table_name(path)]
  replicated = [x for path, x in flat if not tables.table_name(path)]
  table_squares = sum((jnp.dot(jnp.ravel(x), jnp.ravel(x)) for x in sharded),
                      jnp.zeros((), jnp.float32))
  return jnp.sqrt(_sum_squares(replicated) + jax.lax.psum(table_squares, MODEL_AXIS))


def _sum_squares(leaves) -> jax.Array:
  if not leaves:
    return jnp.zeros((), jnp.float32)
  vec = jnp.concatenate([jnp.ravel(x) for x in leaves])
  return jnp.dot(vec, vec)


def clip_by_global_norm(max_norm: float, shards: int = 1) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` (same rule, same empty state) with ``global_norm``."""
  def update(updates, state, params=None):
    del params
    g_norm = global_norm(updates, shards)
    trigger = g_norm < max_norm
    updates = jax.tree.map(
        lambda t: jnp.where(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm),
        updates)
    return updates, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(lr: float, weight_decay: float, clip: float,
              shards: int = 1) -> optax.GradientTransformation:
  """The players' optimiser: clipping by the global norm, then AdamW."""
  return optax.chain(clip_by_global_norm(clip, shards),
                     optax.adamw(lr, weight_decay=weight_decay))
