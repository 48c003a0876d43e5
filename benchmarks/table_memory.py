"""Per-device memory of the DNR state against the catalogue size, tables replicated or
split by rows (``TrainConfig.model_parallel``); ``benchmarks.step --table_items``.

Three figures for one (items, model_parallel) on ``devices``:

* **analytic**: the bytes one device holds of the parameters and of the optimiser
  state (both players; each row-sharded table ``ceil(rows / M)`` rows);
* **compiled**: XLA's memory analysis of the compiled model-phase train step, per
  device: arguments (state and batch), outputs (the donated state is aliased),
  temporaries and peak. Compiled from abstract inputs, nothing is allocated, so it
  runs at any size;
* **allocated** (when twice the analytic bytes over all devices fit under a limit): the
  state created straight onto the devices (no host copy) and the bytes the fullest
  device then holds, in a child process (``allocated_in_child``) whose peak RSS is
  reported too: the host allocator keeps freed buffers for reuse, so sizes measured
  one after another in one process would add up.
"""

from __future__ import annotations

import numpy as np


def _abstract_state(config, lists: dict):
  import jax
  from dnr_jax import batch as batch_lib
  from dnr_jax import step as step_lib
  example = batch_lib.ListBatch.from_arrays({k: v[:1] for k, v in lists.items()})
  return example, jax.eval_shape(
      lambda: step_lib.create_state(config, example, jax.random.PRNGKey(0)))


def analytic_bytes(config, lists: dict) -> dict:
  """Bytes of the parameters and optimiser states one device holds."""
  import jax
  from dnr_jax.models import tables
  _, state = _abstract_state(config, lists)
  m = config.model_parallel

  def nbytes(path, x) -> int:
    rows = x.shape[0] if x.shape else 1
    if tables.table_name(path):
      rows = tables.rows_per_shard(rows, m)
    per_row = int(np.prod(x.shape[1:])) if x.shape else 1
    return rows * per_row * np.dtype(x.dtype).itemsize
  sizes = {"params": 0, "optimizer": 0}
  for player in (state.reranker, state.generator):
    for key, tree in (("params", player.params), ("optimizer", player.opt_state)):
      sizes[key] += sum(nbytes(p, x) for p, x in
                        jax.tree_util.tree_flatten_with_path(tree)[0])
  table_params = sum(
      nbytes(p, x) for player in (state.reranker, state.generator)
      for p, x in jax.tree_util.tree_flatten_with_path(player.params)[0]
      if tables.table_name(p))
  return {"params_bytes": sizes["params"], "optimizer_bytes": sizes["optimizer"],
          "state_bytes": sizes["params"] + sizes["optimizer"],
          "table_params_bytes": table_params}


def _placed_abstract(runner, state):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  if runner.config.model_parallel > 1:
    return runner.checkpoint_like(state)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(runner.mesh, P())), state)


def compiled_memory(config, devices, lists: dict, phase: str = "model") -> dict:
  """XLA's per-device memory analysis of the ``phase`` train step (nothing allocated)."""
  import jax
  from jax.sharding import NamedSharding
  from dnr_jax import batch as batch_lib
  from dnr_jax.runtime import runner as runner_lib
  runner = runner_lib.Runner(config, tuple(devices))
  _, state = _abstract_state(config, lists)
  b = config.global_batch_size
  batch = {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype,
                                   sharding=NamedSharding(runner.mesh, runner.data_spec))
           for k, v in lists.items()}
  compiled = runner.train_fn(phase).lower(
      _placed_abstract(runner, state), batch_lib.ListBatch(**batch)).compile()
  m = compiled.memory_analysis()
  return {"argument_bytes": m.argument_size_in_bytes,
          "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
          "temp_bytes": m.temp_size_in_bytes,
          "peak_bytes": getattr(m, "peak_memory_in_bytes", None)}


def allocated_bytes(config, devices, lists: dict) -> int:
  """The state's bytes on the fullest device once created on ``devices``.

  Created as training creates it (``Runner.init_state``): with ``model_parallel > 1``
  by one program whose outputs are already split, so a table shard is written only
  on its own device and the whole table never exists on one device or on the host;
  a replicated state is created on the default device and placed on the others.
  """
  import jax
  from dnr_jax.runtime import runner as runner_lib
  runner = runner_lib.Runner(config, tuple(devices))
  example, _ = _abstract_state(config, lists)
  state = runner.put_state(runner.init_state(example, jax.random.PRNGKey(0)))
  jax.block_until_ready(state)
  per_device = {}
  for x in jax.tree.leaves(state):
    for s in x.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
  del state
  return max(per_device.values())


def _child(config_dict: dict, num_devices: int, lists: dict, out) -> None:
  import resource
  import jax
  from dnr_jax import config as config_lib
  config = config_lib.from_dict(config_dict)
  got = allocated_bytes(config, jax.devices()[:num_devices], lists)
  out.put((got, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def allocated_in_child(config, num_devices: int, lists: dict) -> tuple[int, int]:
  """``allocated_bytes`` in a fresh process: ``(bytes on the fullest device, the
  child's peak RSS in bytes)``. The child inherits ``XLA_FLAGS`` (the host devices)."""
  import multiprocessing
  from dnr_jax import config as config_lib
  ctx = multiprocessing.get_context("spawn")
  out = ctx.Queue()
  small = {k: v[:1] for k, v in lists.items()}
  proc = ctx.Process(target=_child, args=(config_lib.to_dict(config), num_devices,
                                          small, out))
  proc.start()
  proc.join()
  if proc.exitcode != 0:
    raise RuntimeError(f"the allocation child exited with {proc.exitcode} (out of "
                       "memory? lower --allocate_limit_gb)")
  return out.get(timeout=10)
