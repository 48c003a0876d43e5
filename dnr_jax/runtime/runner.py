"""Compiles the DNR step across devices and places state and batches on them.

``Runner`` compiles ``step.train_step``, ``step.eval_step`` and ``step.score_step``
with ``jax.jit(jax.shard_map(...))`` over a 1-D ``'batch'`` mesh or with ``jax.pmap``
(``TrainConfig.compile``), donates the state, and hides the placement from callers.
With ``TrainConfig.model_parallel = M > 1`` the mesh is ``('batch', 'model')``,
``[devices / M, M]``: the batch is split over all devices, the item and user tables
and their optimiser moments by rows over ``'model'`` (``models.tables``), padded
to a multiple of ``M`` on the devices and unpadded on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax.models import tables
from dnr_jax.parallel import AXIS, MODEL_AXIS, data_axes
from dnr_jax.step import DNRState, eval_step, score_step, train_step
from dnr_jax.step import create_state as step_create_state


@dataclasses.dataclass
class Runner:
  """Places state and batches on the devices and runs the compiled steps.

  ``compile="pmap"``: the state is replicated with a leading device axis and batches
  are reshaped to ``[devices, B / devices, ...]``. ``compile="shard_map"``: the state is
  a replicated global array and batches are global arrays sharded along a 1-D
  ``'batch'`` mesh. Callers see neither: they pass host batches and get host values,
  or place batches ahead with ``put_batch`` (in ``pipeline.prefetch``'s thread, so the
  copy overlaps the previous step) and pass the placed ``ListBatch``.

  Each phase's train step is traced once (``traces`` counts it): a batch of a new
  shape or dtype would recompile, and fails loudly instead.

  ``model_parallel > 1``: the placed state's tables are row shards, padded to a
  multiple of ``M`` rows; ``get_state`` gathers and unpads them, and checkpoints
  save the placed state itself (``checkpoint_state``, ``checkpoint_like``), each
  process writing its own shards.

  Multi-process (``dnr_jax.runtime.distributed``): the mesh spans every process's devices
  (``jax.devices()``), each process passes its own share of the global batch, and
  collectives reduce across processes; host values returned are the same in every
  process (``evaluate`` gathers the logits of the whole global batch).
  """
  config: config_lib.TrainConfig
  devices: tuple = ()

  def __post_init__(self):
    # Global devices: with several processes the one mesh spans all of them.
    self.devices = tuple(self.devices or jax.devices())
    m = self.config.model_parallel
    if m == 1:
      self.mesh = Mesh(np.array(self.devices), (AXIS,))
    elif len(self.devices) % m:
      raise errors.ConfigError(f"model_parallel={m} does not divide the "
                               f"{len(self.devices)} devices")
    else:
      self.mesh = Mesh(np.array(self.devices).reshape(-1, m), (AXIS, MODEL_AXIS))
    if m > 1 and self.config.compile != "shard_map":
      raise errors.ConfigError(f"model_parallel={m} needs compile='shard_map' (pmap "
                               "has one mesh axis)")
    self.data_spec = P(data_axes(self.config))
    self.local_devices = tuple(d for d in self.devices
                               if d.process_index == jax.process_index())
    self.multiprocess = len(self.local_devices) < len(self.devices)
    self._train: dict[str, Callable] = {}
    self.traces: dict[str, int] = {}
    self._eval = self._compile(functools.partial(eval_step, config=self.config),
                               out_specs=lambda specs: (P(), self.data_spec),
                               donate=False)
    self._score = self._compile(functools.partial(score_step, config=self.config),
                                out_specs=lambda specs: self.data_spec, donate=False)

  @property
  def num_devices(self) -> int:
    """Devices of the mesh, over all processes."""
    return len(self.devices)

  @property
  def num_local_devices(self) -> int:
    """This process's devices of the mesh (what one ``put_batch`` is split over)."""
    return len(self.local_devices)

  def state_specs(self, tree):
    """The ``PartitionSpec`` of each leaf of a state (or parameter) tree: rows over
    ``'model'`` for the tables when ``model_parallel > 1``, else replicated."""
    if self.config.model_parallel == 1:
      return jax.tree.map(lambda _: P(), tree)
    return jax.tree_util.tree_map_with_path(lambda path, _: self._leaf_spec(path), tree)

  def _leaf_spec(self, path) -> P:
    """One leaf's spec with ``model_parallel > 1``: a table's rows over ``'model'``."""
    return P(MODEL_AXIS) if tables.table_name(path) else P()

  def compile_step(self, body, out_specs, donate: bool) -> Callable:
    """``body(state_or_params, batch)`` compiled over the mesh.

    Args:
      body: a per-device function of the (sharded) state and this device's batch.
      out_specs: ``state specs -> out_specs`` (the state's specs are known only
        from the tree the compiled function is called with).
      donate: donate the first argument.
    """
    return self._compile(body, out_specs, donate)

  def _compile(self, body, out_specs, donate: bool):
    donate_argnums = (0,) if donate else ()
    if self.config.compile == "pmap":
      return jax.pmap(body, axis_name=AXIS, devices=self.devices,
                      donate_argnums=donate_argnums)
    # check_vma=False gives shard_map pmap's semantics: the gradient of a replicated
    # parameter is the *local* gradient, which the body averages with pmean. (With
    # varying-axis checking on, shard_map would already psum it, and the one body
    # would train 8x faster on 8 devices than under pmap.)
    def build(specs):
      return jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=(specs, self.data_spec),
                                   out_specs=out_specs(specs), check_vma=False),
                     donate_argnums=donate_argnums)
    if self.config.model_parallel == 1:
      return build(P())      # one spec for every leaf: no need to see the tree first
    return _PerTree(build, self.state_specs)

  def eval_fn(self) -> Callable:
    """The compiled eval step ``(params, placed batch) -> (sums, logits)``."""
    return self._eval

  def train_fn(self, phase: str) -> Callable:
    if phase not in self._train:
      def body(state, batch):
        # Runs only while tracing: counts compilations of this phase.
        self.traces[phase] = self.traces.get(phase, 0) + 1
        if self.traces[phase] > 1:
          raise RuntimeError(
              f"the {phase!r} train step is being compiled a second time (batch "
              f"shapes {jax.tree.map(jnp.shape, batch.as_dict())}); every step of a "
              f"run must see the same per-device batch shape")
        return train_step(state, batch, config=self.config, phase=phase)
      self._train[phase] = self._compile(body, out_specs=lambda specs: (specs, P()),
                                         donate=True)
    return self._train[phase]

  # Placement.
  def init_state(self, example: batch_lib.ListBatch, key: jax.Array) -> DNRState:
    """The run's initial state (``step.create_state``).

    ``model_parallel == 1``: created on the default device, to be placed by
    ``put_state``. Otherwise created by one program whose outputs are already split:
    each table padded and sharded by rows, the rest replicated, so no device and
    not the host ever holds a whole table. The values are ``create_state``'s (the
    padding rows zero).
    """
    if self.config.model_parallel == 1:
      return step_create_state(self.config, example, key)
    m = self.config.model_parallel

    def place(path, x):
      if tables.table_name(path):
        pad = tables.padded_rows(x.shape[0], m) - x.shape[0]
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
      return jax.lax.with_sharding_constraint(
          x, NamedSharding(self.mesh, self._leaf_spec(path)))
    return jax.jit(lambda b, k: jax.tree_util.tree_map_with_path(
        place, step_create_state(self.config, b, k)))(example, key)

  def put_state(self, state: DNRState) -> DNRState:
    """Places a host state (or parameter tree) on the devices.

    Replicated, or with ``model_parallel > 1`` the tables split by rows (arrays
    already placed that way, e.g. restored from a checkpoint, are kept as they are).
    """
    if self.config.compile == "pmap":
      # A leading device axis, one replica per device (what pmap maps over).
      d = self.num_devices
      sharding = NamedSharding(self.mesh, P(AXIS))
      return jax.tree.map(
          lambda x: _global_from_host(
              np.broadcast_to(np.asarray(x), (d,) + np.shape(x)), sharding), state)
    if self.config.model_parallel > 1:
      return jax.tree_util.tree_map_with_path(self._put_leaf, state)
    sharding = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: _global_from_host(np.asarray(x), sharding), state)

  def _put_leaf(self, path, x):
    sharding = NamedSharding(self.mesh, self._leaf_spec(path))
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    x = np.asarray(x)
    if not tables.table_name(path):
      return _global_from_host(x, sharding)
    rows = tables.padded_rows(x.shape[0], self.config.model_parallel)

    def shard(idx):
      # This device's rows, the padding rows past the table's end as zeros; the
      # padded table is never built on the host.
      lo, hi, _ = idx[0].indices(rows)
      out = np.zeros((hi - lo,) + x.shape[1:], x.dtype)
      out[:max(0, min(hi, x.shape[0]) - lo)] = x[lo:min(hi, x.shape[0])]
      return out
    return jax.make_array_from_callback((rows,) + x.shape[1:], sharding, shard)

  def get_state(self, state: DNRState) -> DNRState:
    """The host copy of a placed state (first replica under pmap; the tables
    gathered from their shards and unpadded with ``model_parallel > 1``)."""
    if self.config.model_parallel > 1:
      return jax.tree_util.tree_map_with_path(self._get_leaf, state)
    return jax.tree.map(lambda x: _first_replica(x, self.config.compile == "pmap"),
                        state)

  def _get_leaf(self, path, x):
    name = tables.table_name(path)
    if not name or not isinstance(x, jax.Array):
      return _first_replica(x, False)
    if x.is_fully_addressable:
      full = np.asarray(x)
    else:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    rows = (self.config.model.num_items if name == "item_embed"
            else self.config.model.num_users)
    if tables.padded_rows(rows, self.config.model_parallel) != full.shape[0]:
      raise errors.ConfigError(
          f"{name} has {full.shape[0]} rows on the devices, not {rows} padded to a "
          f"multiple of model_parallel={self.config.model_parallel}: the config's "
          "vocabulary sizes do not match the state")
    return full[:rows]

  def checkpoint_state(self, state: DNRState):
    """What a checkpoint of the placed ``state`` saves: its host copy, or with
    ``model_parallel > 1`` the placed arrays (orbax writes each process's shards;
    the tables are never gathered)."""
    if self.config.model_parallel > 1:
      return state
    return self.get_state(state)

  def checkpoint_like(self, host_state: DNRState):
    """The restore target matching ``checkpoint_state``: the host state, or with
    ``model_parallel > 1`` the placed shapes and shardings of a state (host or
    placed: restored straight onto the devices, where ``put_state`` keeps them)."""
    if self.config.model_parallel == 1:
      return host_state
    def like(path, x):
      name = tables.table_name(path)
      shape = np.shape(x)
      if name:    # (a placed table is padded already: padding it again is a no-op)
        shape = (tables.padded_rows(shape[0], self.config.model_parallel),) + shape[1:]
      dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
      return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
          self.mesh, self._leaf_spec(path)))
    return jax.tree_util.tree_map_with_path(like, host_state)

  def put_batch(self, arrays) -> batch_lib.ListBatch:
    """Copies this process's host batch to its devices, split along ``'batch'``.

    Thread-safe, so ``pipeline.prefetch`` can run it ahead of the step.
    """
    b = batch_lib.ListBatch.from_arrays(arrays)
    size = b.items.shape[0]
    if size % self.num_local_devices:
      raise ValueError(f"batch of {size} lists is not divisible by the "
                       f"{self.num_local_devices} devices")
    sharding = NamedSharding(self.mesh, self.data_spec)
    if self.config.compile == "pmap":
      # One shard per device along the leading axis pmap maps over, copied now
      # rather than inside the step call (where it would not overlap compute).
      d = self.num_local_devices
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              sharding, np.reshape(x, (d, x.shape[0] // d) + x.shape[1:])), b)
    if not self.multiprocess:
      # One transfer of the whole batch (much cheaper per call than one per field:
      # what a small online batch pays).
      return jax.device_put(jax.tree.map(np.asarray, b), sharding)
    # Each process holds its own slice of the global batch (multi-host input).
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), b)

  def _placed(self, batch) -> batch_lib.ListBatch:
    # A ListBatch is one ``put_batch`` already placed; anything else is host arrays.
    return batch if isinstance(batch, batch_lib.ListBatch) else self.put_batch(batch)

  # Steps.
  def train(self, state: DNRState, batch, phase: str) -> tuple[DNRState, dict]:
    """One step; ``state`` is donated (do not reuse it).

    Args:
      state: the placed state (``put_state``).
      batch: host arrays (a mapping of ``batch.FIELDS``) or the ``ListBatch`` that
        ``put_batch`` returned for them.
      phase: one of ``PHASES``.
    """
    state, metrics = self.train_fn(phase)(state, self._placed(batch))
    if self.config.compile == "pmap":
      # x[0] stays on the device (no wait for the step); across processes it would be
      # a computation on a global array, so there the local replica is read instead.
      metrics = jax.tree.map(
          lambda x: _first_replica(x, True) if self.multiprocess else x[0], metrics)
    return state, metrics

  def evaluate(self, state: DNRState, batch) -> tuple[dict, jax.Array]:
    """Metric sums and logits of one batch (host arrays or ``put_batch``'s output).

    The sums cover the global batch (``psum`` over every device of every process);
    so do the logits, ``[global batch, n]``: with several processes they are gathered
    from all of them (``process_allgather``) for the exact global AUC.
    """
    return self.evaluate_params(state.reranker.params, batch)

  def evaluate_params(self, params, batch) -> tuple[dict, jax.Array]:
    """``evaluate`` with the reranker parameters alone (``serving``: no state).

    The same compiled program, so a served reranker's logits are bit-identical to
    the ones its training run was selected on.
    """
    sums, logits = self._eval(params, self._placed(batch))
    if self.config.compile == "pmap" or self.multiprocess:
      sums = jax.tree.map(
          lambda x: _first_replica(x, self.config.compile == "pmap"), sums)
    return sums, self._global_logits(logits)

  def _global_logits(self, logits) -> jax.Array:
    """``[global batch, n]`` logits: gathered from every process, pmap's device axis
    folded into the batch."""
    if self.multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      logits = multihost_utils.process_allgather(logits, tiled=True)
    if self.config.compile == "pmap":
      logits = logits.reshape((-1,) + logits.shape[2:])
    return logits

  def score_params(self, params, batch) -> jax.Array:
    """The logits ``[B, n]`` of ``batch`` alone (``step.score_step``), for serving.

    ``evaluate_params`` without the metric sums. On one device, host arrays go to
    the compiled program as they are: its own dispatch copies them for far less per
    call than ``put_batch``'s ``device_put`` of the whole tree (what every small
    online batch pays; docs/serving_tuning.md). Equal to ``evaluate_params``' logits (a
    test pins them to the bit).
    """
    if (self.num_devices == 1 and self.config.compile != "pmap"
        and not isinstance(batch, batch_lib.ListBatch)):
      batch = jax.tree.map(np.asarray, batch_lib.ListBatch.from_arrays(batch))
    return self._global_logits(self._score(params, self._placed(batch)))


class _PerTree:
  """A step compiled once per state tree structure, with specs from its paths (the
  table leaves are known only from the tree it is called with)."""

  def __init__(self, build: Callable, specs_of: Callable):
    self._build, self._specs_of, self._built = build, specs_of, {}

  def _fn(self, tree):
    treedef = jax.tree.structure(tree)
    if treedef not in self._built:
      self._built[treedef] = self._build(self._specs_of(tree))
    return self._built[treedef]

  def __call__(self, tree, batch):
    return self._fn(tree)(tree, batch)

  def lower(self, tree, batch):
    return self._fn(tree).lower(tree, batch)


def _global_from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value every process holds in full (the same one)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _first_replica(x: jax.Array, leading_device_axis: bool):
  """The host value of a replicated array, from this process's first shard.

  Read from an addressable shard, so it works when the array spans processes, and
  moves no data between devices. Under pmap the shard keeps the device axis (size 1).
  """
  if not isinstance(x, jax.Array):
    return x
  shard = np.asarray(x.addressable_data(0))
  return shard[0] if leading_device_axis else shard
