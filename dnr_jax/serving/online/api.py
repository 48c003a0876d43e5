"""The reranker as LitServe's API: the inference worker's side of the service.

``RerankAPI`` loads the bundle, compiles every padded batch size at start-up, and
scores each batch of checked requests (``requests.CheckedRequest``, checked in the
HTTP process by ``endpoint.RerankEndpoint``) with the reranker's compiled scoring
program (``runtime.Runner.score_params``: the eval program's logits without its
metrics); each reply leaves the worker as finished JSON bytes.

(No ``from __future__ import annotations`` in this file: LitServe reads
``RerankAPI.decode_request``'s annotation when it registers its route.)
"""

import gc
import inspect
import json
import os
import signal
import sys
import time

import litserve as ls
import numpy as np
import orjson
import starlette.requests
from absl import logging

from dnr_jax.serving.online import batches
from dnr_jax.serving.online import batching
from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online import requests as requests_lib

PATH = requests_lib.PATH
# JAX's settings of how much accelerator memory its client takes (the first is the
# second's newer name: jaxlib refuses both at once).
MEMORY_SETTINGS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                   "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
  """The padded batch sizes: powers of two up to ``max_batch_size``."""
  return tuple(1 << i for i in range(max_batch_size.bit_length()))


def worker_cores(available, worker: int, per_worker: int) -> list[int]:
  """The cores of inference worker ``worker`` (0, 1, ...) when each has
  ``per_worker`` of its own: taken from the end of ``available`` (the lowest cores,
  where the HTTP processes and the system tend to run, go last)."""
  cores = sorted(available)
  end = len(cores) - worker * per_worker
  if per_worker < 1 or end - per_worker < 0:
    raise ValueError(f"worker {worker} with {per_worker} core(s) each: only "
                     f"{len(cores)} core(s) available")
  return cores[end - per_worker:end]


def _bucket(size: int, buckets: tuple[int, ...]) -> int:
  return next(b for b in buckets if b >= size)


def _signature_once(fn):
  fn.__signature__ = inspect.signature(fn)
  return fn


class RerankAPI(ls.LitAPI):
  """The reranker as LitServe's API: decode (already checked), batch, score, reply."""

  def __init__(self, bundle_dir: str, limits: requests_lib.RequestLimits, drained, *,
               max_batch_size: int, batch_timeout_ms: float, workers: int = 1,
               cores_per_worker: int = 0):
    super().__init__(max_batch_size=max_batch_size,
                     batch_timeout=batch_timeout_ms / 1000.0, api_path=PATH,
                     loop=batching.QueueDelayLoop())
    self.bundle_dir, self.limits, self.drained = bundle_dir, limits, drained
    self.buckets = bucket_sizes(max_batch_size)
    self.workers = workers
    self.cores_per_worker = cores_per_worker

  def setup(self, device):
    # The main process drains the HTTP side first; this worker must go on answering
    # until then, whatever signal the process group received.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, self._on_term)
    self.parent = os.getppid()
    # LitServe numbers its workers 0, 1, ... in this variable.
    worker = os.environ.get("LITSERVE_WORKER_ID", "0")
    # This worker's count of lists scored, labelled once.
    self._scored = metrics_lib.get().lists.labels(worker=worker)
    if self.workers > 1 and not any(k in os.environ for k in MEMORY_SETTINGS):
      # On an accelerator, JAX's client takes 75% of its memory at start-up: the
      # second worker would find none. Split that among the workers (read when JAX
      # starts its backend, below; no effect on CPU). The older name: every jaxlib
      # this project supports reads it.
      os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.75 / self.workers:.4f}"
    if self.cores_per_worker:
      # Before JAX starts its CPU client, which sizes its thread pool to the cores
      # this process may run on: on a few cores shared with the HTTP side, the
      # model's threads then wait less on each other (docs/serving_tuning.md).
      os.sched_setaffinity(0, worker_cores(os.sched_getaffinity(0), int(worker),
                                           self.cores_per_worker))
    import jax  # pylint: disable=g-import-not-at-top
    from dnr_jax.runtime import runner as runner_lib  # pylint: disable=g-import-not-at-top
    from dnr_jax.serving import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
    bundle = bundle_lib.load_bundle(self.bundle_dir)
    self.vocab = bundle.vocabulary()
    index = int(str(device).rpartition(":")[2]) if ":" in str(device) else 0
    jax_device = jax.local_devices()[index]
    self.runner = runner_lib.Runner(bundle.config, (jax_device,))
    self.params = self.runner.put_state(jax.tree.map(np.asarray, bundle.params))
    t0 = time.time()
    warm = requests_lib.CheckedRequest(user_id="", item_ids=["?"], scores=[0.5],
                                       history=[], user_features={},
                                       item_features={})
    for b in self.buckets:
      self._score([warm] * b)
    # JAX's and the model's objects stay for the worker's life: keep full collections
    # under load from walking them.
    gc.collect()
    gc.freeze()
    logging.info("reranker %s (%s/%s) ready on %s%s: batch sizes %s compiled in "
                 "%.1fs", self.bundle_dir, bundle.config.model.backbone,
                 bundle.config.method, jax_device,
                 f" (cores {sorted(os.sched_getaffinity(0))})"
                 if self.cores_per_worker else "", list(self.buckets),
                 time.time() - t0)

  def _on_term(self, signum, frame):
    del signum, frame
    # After the drain, or when the main process is gone (killed outright: nobody
    # will drain), a SIGTERM stops the worker; before, it is the main process's job.
    if self.drained.is_set() or os.getppid() != self.parent:
      sys.exit(0)

  def _score(self, batch):
    arrays, unknown = batches.encode(batch, self.vocab, self.limits)
    size = _bucket(len(batch), self.buckets)
    pad = size - len(batch)
    padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              if pad else v for k, v in arrays.items()}
    logits = np.asarray(self.runner.score_params(self.params, padded))[:len(batch)]
    return batches.replies(batch, logits, arrays["mask"], unknown), unknown

  # LitServe's batch loop calls ``inspect.signature`` on these methods for every
  # request (it looks for a ``context`` parameter): as static methods with their
  # signature computed once, that is an attribute read instead of ~9 us each.

  @staticmethod
  @_signature_once
  def decode_request(request: starlette.requests.Request):
    # What ``endpoint.RerankEndpoint`` queued: a ``CheckedRequest``. (The annotation
    # is for LitServe's own route of the path, which the endpoint shadows.)
    return request

  @staticmethod
  @_signature_once
  def batch(inputs):
    return list(inputs)

  @_signature_once
  def predict(self, x):
    out, unknown = self._score(x)
    m = metrics_lib.get()
    m.batch_size.observe(len(x))
    self._scored.inc(len(x))
    for column, counts in unknown.items():
      total = int(counts.sum())
      if total:
        m.unknown_ids.labels(column=column).inc(total)
    return out

  @staticmethod
  @_signature_once
  def unbatch(output):
    return output

  @staticmethod
  @_signature_once
  def encode_response(output):
    # The reply's JSON is made here, in the worker, and travels as bytes: the HTTP
    # process (the busier one) then only sends it. orjson writes the standard
    # library's JSON values in a tenth of its time (a NaN list_id as null, where the
    # standard library wrote the non-JSON NaN); a list_id or an id it cannot write
    # (an integer past 64 bits) goes to the standard library.
    try:
      return orjson.dumps(output)
    except TypeError:
      return json.dumps(output, separators=(",", ":")).encode()
