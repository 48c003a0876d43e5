"""Multi-process set-up shared by every binary: JAX's distributed runtime.

One process per host (or per accelerator) runs the same program. ``initialize``
connects them through ``jax.distributed.initialize`` before any JAX computation; from
then on ``jax.devices()`` lists every process's devices, the step's ``'batch'`` mesh
spans them all (``runtime.runner.Runner``), each process feeds its own share of every global
batch (``pipeline.batches``), and collectives (``pmean``/``psum``) reduce across
processes. Only the primary process (index 0) writes metrics, tables and plots;
checkpoints are written by orbax, which every process calls (it coordinates itself).

When to connect (``DistributedConfig.mode``):

* ``"auto"`` (default): with any of coordinator address, number of processes or
  process id given, connect with them (what is missing comes from the cluster's
  environment when JAX detects one); with none given, connect only where JAX's
  cluster auto-detection applies (SLURM, Open MPI, Cloud TPU pod slices, GKE,
  Kubernetes) and reports more than one process; otherwise run as one process.
* ``"on"``: always connect (fails where nothing tells JAX who the others are).
* ``"off"``: never connect; one process.

On CPU the cross-process collectives need an implementation (gloo): it is chosen
before the backends start, which is also what makes the multi-process path testable
on one machine (``tests/multihost_test.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from typing import Any, Callable, Optional, TypeVar

import jax
import numpy as np
from absl import logging

from dnr_jax import errors

MODES = ("auto", "on", "off")
T = TypeVar("T")
_barriers = itertools.count()   # the coordination service wants unique barrier ids


class DistributedError(errors.DNRError):
  """The processes of a multi-process run disagree or cannot be set up."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process run (see the module docstring).

  Attributes:
    mode: ``"auto"``, ``"on"`` or ``"off"``.
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: how many processes take part.
    process_id: this process's index, ``0 <= process_id < num_processes``.
    local_device_ids: the local accelerators this process uses (e.g. one GPU per
      process: ``(local_rank,)``); ``None``: all of them.
    initialization_timeout_s: how long to wait for the other processes to connect.
  """
  mode: str = "auto"
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[tuple[int, ...]] = None
  initialization_timeout_s: int = 300

  @property
  def explicit(self) -> bool:
    """Whether any of the connection settings was given."""
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id, self.local_device_ids))

  def validate(self) -> None:
    def fail(msg):
      raise errors.ConfigError(f"distributed: {msg}")
    if self.mode not in MODES:
      fail(f"mode={self.mode!r} is not one of {MODES}")
    if self.mode == "off" and self.explicit:
      fail("mode='off' contradicts the coordinator address / number of processes / "
           "process id given")
    if self.num_processes is not None and self.num_processes < 1:
      fail(f"num_processes={self.num_processes} must be >= 1")
    if self.process_id is not None:
      if self.process_id < 0:
        fail(f"process_id={self.process_id} must be >= 0")
      if self.num_processes is not None and self.process_id >= self.num_processes:
        fail(f"process_id={self.process_id} must be < num_processes="
             f"{self.num_processes}")
    if self.coordinator_address is not None:
      host, colon, port = self.coordinator_address.rpartition(":")
      if not colon or not host or not port.isdigit():
        fail(f"coordinator_address={self.coordinator_address!r} is not HOST:PORT")
    if self.initialization_timeout_s < 1:
      fail(f"initialization_timeout_s={self.initialization_timeout_s} must be >= 1")
    if self.explicit and detected_cluster() is None:
      # Without a cluster environment JAX cannot fill in what is missing.
      missing = [n for n, v in (("coordinator_address", self.coordinator_address),
                                ("num_processes", self.num_processes),
                                ("process_id", self.process_id)) if v is None]
      if missing:
        fail(f"{', '.join(missing)} missing (no SLURM/MPI/TPU cluster environment "
             "detected to provide them)")


def detected_cluster() -> Optional[str]:
  """The cluster environment JAX's auto-detection would use, or ``None``.

  Asks JAX's own detectors (``jax._src.clusters``, private: on a JAX without them
  only the SLURM, Open MPI and TPU-worker variables are looked at). The opt-in
  detectors (mpi4py) are skipped, as ``jax.distributed.initialize()`` does.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if not env.opt_in_only_method and env.is_env_present():
        return env.__name__
    return None
  except (ImportError, AttributeError):
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
      return "SlurmCluster"
    if "OMPI_MCA_orte_hnp_uri" in os.environ:
      return "OmpiCluster"
    if "TPU_WORKER_HOSTNAMES" in os.environ:
      return "TpuCluster"
    return None


def _detected_process_count(cluster: str) -> Optional[int]:
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    env = next(e for e in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if e.__name__ == cluster)
    return int(env.get_process_count())
  except Exception:  # pylint: disable=broad-except
    return None


def is_initialized() -> bool:
  """Whether ``jax.distributed.initialize`` has run in this process."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.client is not None
  except (ImportError, AttributeError):
    return jax.process_count() > 1


def _use_cpu_collectives() -> None:
  # Cross-process collectives on the CPU backend need an implementation, and it must
  # be chosen before the backends start, when the platform is not known yet. It
  # affects the CPU client only, so choosing gloo is harmless on GPU/TPU hosts; a
  # choice the user made (e.g. mpi) is kept.
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(config: DistributedConfig = DistributedConfig()) -> dict[str, Any]:
  """Joins the multi-process run ``config`` describes (or stays one process).

  Call once, at the start of a binary, before any JAX computation.

  Returns:
    ``{"process_index", "process_count", "local_devices", "global_devices",
    "platform", "cluster"}``, also logged.
  """
  config.validate()
  cluster = detected_cluster()
  connect = False
  if is_initialized():
    logging.info("distributed: already initialized")
  elif config.mode == "on" or config.explicit:
    connect = True
  elif config.mode == "auto" and cluster is not None:
    count = _detected_process_count(cluster)
    connect = count is not None and count > 1
    if count is None:
      # E.g. a CI job inside a Kubernetes pod: guessing would hang on a coordinator
      # nobody runs, so one process, and the user can say otherwise.
      logging.warning("distributed: %s detected but its process count is unknown; "
                      "running as one process (--distributed=on to connect)", cluster)
  if connect:
    _use_cpu_collectives()
    logging.info("distributed: connecting (%s)", "cluster " + cluster if cluster and
                 not config.explicit else f"coordinator {config.coordinator_address}")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes, process_id=config.process_id,
        local_device_ids=(list(config.local_device_ids)
                          if config.local_device_ids is not None else None),
        initialization_timeout=config.initialization_timeout_s)
  if connect and jax.process_count() > 1:
    _warm_up_collectives()
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(),
          "global_devices": jax.device_count(), "platform": jax.default_backend(),
          "cluster": cluster if connect and not config.explicit else None}
  logging.info("process %d of %d: %d local / %d global %s device(s)%s",
               info["process_index"], info["process_count"], info["local_devices"],
               info["global_devices"], info["platform"],
               f" (cluster {info['cluster']})" if info["cluster"] else "")
  return info


def _warm_up_collectives() -> None:
  # The first collective over a set of devices opens its communicators (gloo on CPU),
  # and the processes must all arrive within that library's own short timeout (30 s
  # for gloo). Were that first collective the train step's, a process still compiling
  # it (a loaded machine, another cache state) would fail the others. So meet first
  # at the coordination service's barrier (no such timeout), then open them on a
  # tiny all-device collective that compiles in no time.
  barrier("collectives")
  any_process(False)


def is_primary() -> bool:
  """Whether this process writes the run's files (metrics, tables, plots)."""
  return jax.process_index() == 0


def barrier(name: str, timeout_s: int = 24 * 3600) -> None:
  """Waits until every process reaches ``barrier(name)``; no-op in one process.

  Uses the coordination service's barrier, which waits without holding a device
  collective open (data preparation may keep process 0 busy for an hour).
  """
  if jax.process_count() == 1:
    return
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
  except (ImportError, AttributeError):
    client = None
  if client is not None:
    # Every process calls barriers in the same order, so the counter agrees.
    client.wait_at_barrier(f"dnr_jax:{name}:{next(_barriers)}",
                           timeout_in_ms=timeout_s * 1000)
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def fingerprint(tree: Any) -> int:
  """A 63-bit hash of a pytree of arrays (shapes, dtypes and bytes)."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return int.from_bytes(h.digest()[:8], "little") >> 1


def check_same(value: int, what: str) -> None:
  """Raises ``DistributedError`` unless ``value`` is the same in every process."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  hi, lo = value >> 32, value & 0xFFFFFFFF
  values = np.asarray(multihost_utils.process_allgather(
      np.array([hi, lo], np.uint32))).reshape(-1, 2)
  values = [(int(a) << 32) | int(b) for a, b in values]
  if len(set(values)) > 1:
    differ = [i for i, v in enumerate(values) if v != values[0]]
    raise DistributedError(
        f"{what} differ between processes (process 0 vs {differ}); put the data "
        "directory on a file system every process shares")


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is true in any process (a collective: every process must call).

  For decisions every process must take at the same step, such as stopping on a
  signal that reaches the processes at different times. One process: ``flag``,
  without waiting for anything.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array(bool(flag)))))


def primary_first(fn: Callable[[], T], name: str) -> T:
  """``fn()`` on process 0, then on every other process once it has finished.

  For work with a cache (data preparation): process 0 builds it, the others then find
  it on a shared file system, or, where the file system is per host, repeat the same
  deterministic work on their own disk instead of writing one cache concurrently.
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if is_primary() else None
  barrier(f"{name}:primary-done")
  if not is_primary():
    out = fn()
  return out
