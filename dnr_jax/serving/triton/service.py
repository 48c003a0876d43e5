"""The online service's request on Triton Inference Server, with no Python per request.

``serve`` turns a trained run into a running ``tritonserver``:

1. the reranker as an ONNX model (``serving.export_reranker``), its vocabulary and
   request limits;
2. the ``dnr`` backend, compiled once (``build``);
3. a model repository (``repository``) and Triton 2.51 from the nvidia-pytriton
   wheel (``server``);
4. ``tritonserver`` as a child process, its readiness logged, SIGTERM and SIGINT
   passed on to it (Triton stops taking requests, answers those in flight within
   ``drain_timeout_s``, and exits).

Triton's HTTP front end and dynamic batcher are C++, and the backend does in C++
what the LitServe service's Python does: the body's JSON, the checks with their
one-line errors, the vocabulary, the arrays, the model (ONNX Runtime) and the reply.
The request and reply are the service's JSON, carried in Triton's protocol
(``client``): ``POST /v2/models/dnr_rerank/infer``. Triton's own endpoints serve
health (``/v2/health/live``, ``/v2/health/ready``) and Prometheus metrics (requests,
failures, batch executions, queue and compute times; ``metrics_port``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import Callable

from absl import logging

from dnr_jax import errors
from dnr_jax.serving import ports
from dnr_jax.serving.triton import build
from dnr_jax.serving.triton import repository
from dnr_jax.serving.triton import server as server_lib
from dnr_jax.serving.triton import sources

_HOSTS = ("127.0.0.1", "0.0.0.0", "::")


@dataclasses.dataclass(frozen=True)
class TritonServiceConfig:
  """How to serve a trained reranker on Triton.

  Attributes:
    checkpoint: a run directory of ``experiments.lists``, its bundle, or a workdir
      holding one run (``serving.load_bundle``).
    host / port: where Triton's HTTP endpoint listens.
    metrics_port: where its Prometheus metrics are served (0: not served).
    max_batch_size: the most lists Triton's dynamic batcher puts in one batch.
    queue_delay_us: how long a request may wait in Triton's queue for others.
    max_candidates: the most candidates a request may send (0: the reranker's ``n``).
    instances: model instances (Triton's ``instance_group`` count), each running
      batches on a thread of its own with its own ONNX Runtime session.
    intra_op_threads: ONNX Runtime's threads per instance (0: one per core; on a
      machine with few cores, shared with the HTTP front end, 1 serves more).
    drain_timeout_s: on SIGTERM, at most this long to answer the requests in flight.
    workdir: where the repository is written ('' : a temporary folder, removed at
      exit).
    triton_dir: the unpacked nvidia-pytriton wheel (fetched there if missing).
    sources_dir: Triton's and ONNX Runtime's headers for the build ('' : the
      ``sources`` cache, fetched there if missing).
  """
  checkpoint: str
  host: str = "127.0.0.1"
  port: int = 8000
  metrics_port: int = 8002
  max_batch_size: int = 64
  queue_delay_us: int = repository.DEFAULT_QUEUE_DELAY_US
  max_candidates: int = 0
  instances: int = 1
  intra_op_threads: int = 1
  drain_timeout_s: int = 30
  workdir: str = ""
  triton_dir: str = server_lib.DEFAULT_DIR
  sources_dir: str = ""

  def validate(self) -> None:
    """Raises ``ConfigError`` on a setting Triton would refuse or misread."""
    if self.host not in _HOSTS:
      raise errors.ConfigError(f"host={self.host!r}: one of {list(_HOSTS)}")
    for name in ("port",) + (("metrics_port",) if self.metrics_port else ()):
      if not 1024 <= getattr(self, name) <= 65535:
        raise errors.ConfigError(f"{name}={getattr(self, name)} must be in 1024..65535")
    if self.metrics_port == self.port:
      raise errors.ConfigError(f"metrics_port={self.metrics_port} is the port itself")
    if self.max_batch_size < 1:
      raise errors.ConfigError(f"max_batch_size={self.max_batch_size} must be >= 1")
    if self.queue_delay_us < 0:
      raise errors.ConfigError(f"queue_delay_us={self.queue_delay_us} must be >= 0")
    if self.max_candidates < 0:
      raise errors.ConfigError(f"max_candidates={self.max_candidates} must be >= 0")
    if not 1 <= self.instances <= 64:
      raise errors.ConfigError(f"instances={self.instances} must be in 1..64")
    if self.intra_op_threads < 0:
      raise errors.ConfigError(f"intra_op_threads={self.intra_op_threads} must be >= 0 "
                               "(0: ONNX Runtime's default, one per core)")
    if self.drain_timeout_s < 0:
      raise errors.ConfigError(f"drain_timeout_s={self.drain_timeout_s} must be >= 0")


def prepare(config: TritonServiceConfig, folder: str,
            log: Callable[[str], None] = logging.info) -> tuple[list[str], dict]:
  """Writes the repository of ``config`` under ``folder`` and returns the
  ``tritonserver`` command that serves it, and its environment.

  Raises:
    DNRError: a bad config or checkpoint, a taken port (one line).
    sources.Unavailable / sources.BuildError: the backend cannot be built here.
  """
  from dnr_jax.serving import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving import export as export_lib  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.online import requests as requests_lib  # pylint: disable=g-import-not-at-top
  config.validate()
  ports.check_port_free(config.host, config.port)
  if config.metrics_port:
    ports.check_port_free(config.host, config.metrics_port, "metrics_port")
  bundle = bundle_lib.load_bundle(config.checkpoint)
  vocab = bundle.vocabulary()
  if vocab.buckets:
    raise errors.ConfigError(
        f"{bundle.directory}: ids hashed into {vocab.buckets} rows (id_buckets) are not "
        "served by the Triton engine; serve this run with experiments.serve")
  limits = requests_lib.RequestLimits.from_bundle(bundle, config.max_candidates or None)
  log(f"exporting the reranker to ONNX in {folder}/export ...")
  t0 = time.time()
  export = os.path.join(folder, "export")
  export_lib.export_reranker(bundle, export, formats=("onnx",))
  log(f"exported in {time.time() - t0:.1f} s; building the dnr backend (once per "
      "version) ...")
  backend = build.built(source_dir=config.sources_dir or None)
  vocab_file = vocab.save(os.path.join(folder, "vocabulary"))
  repository.write(folder, backend, onnx_file=os.path.join(export, "reranker.onnx"),
                   vocab_file=vocab_file, limits=limits,
                   max_batch_size=config.max_batch_size,
                   queue_delay_us=config.queue_delay_us, instances=config.instances,
                   intra_op_threads=config.intra_op_threads)
  log(f"fetching Triton Inference Server ({server_lib.WHEEL}) into "
      f"{config.triton_dir} where missing ...")
  try:
    wheel = server_lib.unpacked_wheel(config.triton_dir)
  except (RuntimeError, OSError) as e:
    raise sources.Unavailable(f"{e}; or unpack the wheel into {config.triton_dir} "
                              "by hand") from e
  return server_lib.command(folder, wheel, port=config.port, host=config.host,
                            metrics_port=config.metrics_port or None,
                            exit_timeout_s=config.drain_timeout_s,
                            quiet=False), server_lib.environment(wheel)


def _ready(host: str, port: int) -> bool:
  where = "127.0.0.1" if host == "0.0.0.0" else "[::1]" if host == "::" else host
  try:
    with urllib.request.urlopen(f"http://{where}:{port}/v2/models/"
                                f"{repository.MODEL}/ready", timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


class _Stopped(BaseException):
  """A signal before Triton started, raised from the signal handler. Not an
  ``Exception``, so no ``except Exception`` on the way (logging's, around a log
  line being written) takes it; ``serve`` turns it into ``errors.Interrupted``."""


def _die_with_parent() -> Callable[[], None]:
  """A ``preexec_fn`` that has the child sent SIGTERM when this process dies (Linux's
  PR_SET_PDEATHSIG): a server left behind by a killed parent would hold the port.
  libc is loaded here, before the fork: a child of a process with threads (JAX's)
  should only make plain system calls."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
  except (OSError, AttributeError):
    return lambda: None
  return lambda: prctl(1, signal.SIGTERM)


def serve(config: TritonServiceConfig,
          log: Callable[[str], None] = logging.info) -> int:
  """Prepares and runs ``tritonserver`` until it exits; returns its exit status: 0
  after a drain on SIGTERM or SIGINT, which are passed on to it.

  Raises:
    DNRError: what ``prepare`` raises; ``errors.Interrupted`` for a signal before
      the server started (the temporary folder is removed); the server failing to
      start, or killed by a signal.
  """
  proc = None
  stopping = []

  def stop(signum, frame):
    del frame
    stopping.append(signum)
    if proc is None:
      raise _Stopped(signum)
    log(f"{signal.Signals(signum).name}: draining (at most {config.drain_timeout_s} "
        "s) ...")
    proc.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    with tempfile.TemporaryDirectory(prefix="dnr_triton_") as tmp:
      folder = config.workdir or tmp
      if config.workdir and os.path.exists(os.path.join(folder, "repo")):
        raise errors.ConfigError(f"workdir={folder} already holds a repository (repo/); "
                                 "give an empty or new folder")
      os.makedirs(folder, exist_ok=True)
      argv, env = prepare(config, folder, log)
      if stopping:
        # The handler's exception can be lost: raised inside a finalizer (__del__,
        # a weakref callback) that the garbage collector ran during the export,
        # Python prints and drops it. The signal is still on record.
        raise _Stopped(stopping[0])
      try:
        proc = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent())
      except OSError as e:
        raise errors.DNRError(f"cannot start {argv[0]}: {e.strerror}") from e
      try:
        t0 = time.time()
        while proc.poll() is None and not stopping:
          if _ready(config.host, config.port):
            log(f"ready in {time.time() - t0:.1f} s: POST http://{config.host}:"
                f"{config.port}/v2/models/{repository.MODEL}/infer"
                + (f"; metrics on :{config.metrics_port}/metrics"
                   if config.metrics_port else ""))
            break
          time.sleep(0.2)
        code = proc.wait()
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
  except _Stopped as stopped:   # the temporary folder is gone by now
    raise errors.Interrupted(f"{signal.Signals(stopped.args[0]).name} before Triton "
                             "started") from None
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if code < 0:
    raise errors.DNRError(f"tritonserver was killed by "
                          f"{signal.Signals(-code).name}; its log is above")
  return code
