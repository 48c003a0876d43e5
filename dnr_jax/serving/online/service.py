"""The online reranking service: a trained bundle behind HTTP, on LitServe.

``serve(ServiceConfig(checkpoint=RUN))`` answers ``POST /rerank`` (one list per
request, ``requests``'s format; ``POST /rerank_lists`` takes several, each batched as
a request of its own) with dynamic batching: LitServe's inference worker
takes up to ``max_batch_size`` waiting requests, the oldest of them delayed at most
``batch_timeout_ms`` for company (``batching.QueueDelayLoop``), and scores them in
one call of the reranker's compiled scoring program (``runtime.Runner.score_params``:
the logits of the eval program that ``experiments.rerank`` runs, without its metrics).
Batches are padded to the next power of two (each size compiled once, at start-up),
so a batch never recompiles.

Processes: LitServe runs the HTTP server (uvicorn) in a process of its own
(``http_processes`` of them) and ``workers`` inference workers, each with the reranker
on JAX's first local device, all started by this (the main) process. The workers
take their batches from one queue: while one scores, the next gathers.

* A request is checked in the HTTP process (``endpoint.RerankEndpoint``, with
  ``requests.check_request``): a bad one is answered 400 with ``{"error": "<field>:
  <problem>"}`` there and never joins a batch, so it cannot fail the requests batched
  with it. Malformed JSON is a 400 too.
* The port opens once every worker has loaded the reranker and compiled every batch
  size (``server.PipeQueueServer`` starts the HTTP server then): until then a
  connection is refused, so give a Kubernetes-style startup probe room for the
  compile. Then ``GET /ready`` (readiness) and ``GET /healthz`` (liveness) answer 200;
  ``/ready`` answers 503 if a worker is not ready. ``GET /metrics``: Prometheus
  (``metrics``). ``GET /info``: the model.
* SIGTERM or SIGINT to the main process drains: the listening socket is shut down
  (new connections are refused at once), the HTTP process answers the requests it holds
  (uvicorn's graceful shutdown, at most ``drain_timeout_s``), then the workers are
  stopped and the process exits with status 0. The workers ignore both signals until
  the drain is done (or its parent is gone), so a signal sent to the whole process
  group (Ctrl-C in a terminal, a container runtime's stop) cannot drop the requests in
  flight.
* No authentication: put the service behind your gateway's. (LitServe's
  ``LIT_SERVER_API_KEY`` is refused rather than silently ignored.)
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import sys
import time
from typing import Callable

from absl import logging

from dnr_jax import errors
from dnr_jax.serving import ports
from dnr_jax.serving.online import api as api_lib
from dnr_jax.serving.online import endpoint as endpoint_lib
from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online import requests as requests_lib
from dnr_jax.serving.online import server as server_lib

READY_PATH = "/ready"
LIVE_PATH = "/healthz"
METRICS_PATH = "/metrics"
# LitServe's process names (multiprocessing.Process.name): its HTTP servers.
_HTTP_PROCESS = "LitServer-"


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
  """How to serve a trained reranker.

  Attributes:
    checkpoint: a run directory of ``experiments.lists``, its bundle, or a workdir
      holding one run (``serving.load_bundle``).
    host / port: where to listen (``127.0.0.1``: this machine only; ``0.0.0.0``: all
      interfaces).
    max_batch_size: the most lists scored in one batch (a power of two: every batch
      is padded to one).
    batch_timeout_ms: how long a request may wait for company, counted from when it
      was queued (>= 0; 0: a batch is what is queued when the worker comes for it;
      ``batching``).
    max_candidates: the most candidates a request may send (0: the reranker's ``n``);
      those past ``n`` come back after the reranked ones, in upstream order.
    max_lists_per_request: the most lists a ``POST /rerank_lists`` request may hold
      (each is batched and scored as a request of its own).
    request_timeout_s: a request the worker has not answered within this gets 504.
    drain_timeout_s: at most this long to answer the requests in flight on SIGTERM.
    http_processes: HTTP server processes (LitServe's ``num_api_servers``): on a
      machine with cores to spare, more of them lift the request rate (the HTTP side,
      not the model, limits it: ``docs/serving_tuning.md``).
    workers: inference worker processes (LitServe's ``workers_per_device``), each
      with its own copy of the reranker on JAX's first local device; on a machine
      with cores to spare, for request rates past what one worker's batch loop
      takes. On an accelerator they share its memory: each preallocates
      ``0.75 / workers`` of it unless one of JAX's memory settings is set
      (``api.MEMORY_SETTINGS``).
    worker_cores: 0, or the cores each inference worker binds itself to, cores of
      its own (from the highest down), before JAX starts: JAX's CPU client then
      runs the model on that many threads. On a CPU machine with few cores, shared
      with the HTTP processes, 1 serves more lists/s (``docs/serving_tuning.md``).
      Linux only; at most the cores this process may use, over ``workers``.
    log_level: the servers' log level (uvicorn's names: ``warning``, ``info``, ...).
  """
  checkpoint: str
  host: str = "127.0.0.1"
  port: int = 8000
  max_batch_size: int = 64
  batch_timeout_ms: float = 1.0
  max_candidates: int = 0
  max_lists_per_request: int = 64
  request_timeout_s: float = 30.0
  drain_timeout_s: float = 30.0
  http_processes: int = 1
  workers: int = 1
  worker_cores: int = 0
  log_level: str = "warning"

  def validate(self) -> None:
    if self.max_batch_size < 1 or self.max_batch_size & (self.max_batch_size - 1):
      raise errors.ConfigError(f"max_batch_size={self.max_batch_size} must be a power "
                               "of two (batches are padded to one)")
    if not 0 <= self.batch_timeout_ms < 1000 * self.request_timeout_s:
      raise errors.ConfigError(f"batch_timeout_ms={self.batch_timeout_ms} must be >= 0 "
                               "and below request_timeout_s")
    if self.max_candidates < 0:
      raise errors.ConfigError(f"max_candidates={self.max_candidates} must be >= 0")
    if not 1 <= self.max_lists_per_request <= 1024:
      raise errors.ConfigError(f"max_lists_per_request={self.max_lists_per_request} "
                               "must be in 1..1024")
    if not 1024 <= self.port <= 65535:
      raise errors.ConfigError(f"port={self.port} must be in 1024..65535")
    if self.host not in ("127.0.0.1", "0.0.0.0", "::"):
      raise errors.ConfigError(f"host={self.host!r}: LitServe listens on 127.0.0.1, "
                               "0.0.0.0 or ::")
    if self.http_processes < 1:
      raise errors.ConfigError(f"http_processes={self.http_processes} must be >= 1")
    if not 1 <= self.workers <= 64:
      raise errors.ConfigError(f"workers={self.workers} must be in 1..64")
    if self.worker_cores < 0:
      raise errors.ConfigError(f"worker_cores={self.worker_cores} must be >= 0 (0: "
                               "JAX's threads on every core)")
    if self.worker_cores:
      if not hasattr(os, "sched_setaffinity"):
        raise errors.ConfigError(f"worker_cores={self.worker_cores}: binding a "
                                 "process to cores needs Linux")
      cores = len(os.sched_getaffinity(0))
      if self.workers * self.worker_cores > cores:
        raise errors.ConfigError(
            f"worker_cores={self.worker_cores} with workers={self.workers}: needs "
            f"{self.workers * self.worker_cores} cores of their own, and this "
            f"process may use {cores}")
    if self.request_timeout_s <= 0 or self.drain_timeout_s <= 0:
      raise errors.ConfigError("request_timeout_s and drain_timeout_s must be > 0")


def build_server(config: ServiceConfig, log: Callable[[str], None] = logging.info):
  """The ``litserve.LitServer`` of ``config`` (not started), and its drain event.

  Raises:
    DNRError: a bad config or checkpoint (one line), before any process starts.
  """
  from fastapi.responses import Response  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  config.validate()
  if os.environ.get("LIT_SERVER_API_KEY"):
    raise errors.ConfigError(
        "LIT_SERVER_API_KEY is set, but this service has no authentication (its "
        "requests would not be checked against it): unset it and put the service "
        "behind your gateway's authentication")
  ports.check_port_free(config.host, config.port)
  bundle = bundle_lib.load_bundle(config.checkpoint)
  limits = requests_lib.RequestLimits.from_bundle(bundle, config.max_candidates or None)
  drained = multiprocessing.get_context("spawn").Event()
  api = api_lib.RerankAPI(bundle.directory, limits, drained,
                          max_batch_size=config.max_batch_size,
                          batch_timeout_ms=config.batch_timeout_ms,
                          workers=config.workers,
                          cores_per_worker=config.worker_cores)
  # The inference workers, each on JAX's first local device (a GPU where there is
  # one): LitServe's "cpu" only names the device the worker is handed, which the
  # worker reads as JAX's device 0. JAX is not started here: LitServe forks its HTTP
  # process from this one, and a fork of a process whose JAX runtime has threads can
  # deadlock.
  server = server_lib.PipeQueueServer(
      api, accelerator="cpu", devices=1, workers_per_device=config.workers,
      timeout=config.request_timeout_s, healthcheck_path=READY_PATH,
      model_metadata={"checkpoint": bundle.directory,
                      "backbone": bundle.config.model.backbone,
                      "method": bundle.config.method,
                      "list_size": limits.list_size,
                      "history_size": limits.history_size,
                      "max_candidates": limits.max_candidates,
                      "max_lists_per_request": config.max_lists_per_request,
                      "score_transform": limits.score_transform,
                      "user_features": list(limits.user_features),
                      "item_features": list(limits.item_features)})

  async def live():
    return {"status": "alive"}

  async def prometheus():
    body, content_type = metrics_lib.exposition()
    return Response(body, media_type=content_type)

  # uvicorn's graceful shutdown is the drain: bound it by the config.
  server.uvicorn_graceful_timeout = config.drain_timeout_s
  # The endpoint answers POST /rerank and /rerank_lists in front of the whole
  # middleware stack that Starlette builds (its error middleware and LitServe's
  # telemetry and body-limit layers, each a call per request: docs/serving_tuning.md),
  # none of which those paths need: the endpoint limits its bodies itself, and an
  # exception it raises gets uvicorn's 500, as it got Starlette's. A body is refused
  # (413) before it is parsed past max_body (per list): room for the most candidates
  # and history ids a list may hold, at 256 bytes each.
  build_stack = server.app.build_middleware_stack

  def build_stack_behind_endpoint():
    return endpoint_lib.RerankEndpoint(
        build_stack(), server=server, limits=limits,
        timeout_s=config.request_timeout_s, max_lists=config.max_lists_per_request,
        max_body=65536 + 256 * (limits.max_candidates * (
            2 + len(limits.item_features)) + requests_lib.MAX_HISTORY))

  server.app.build_middleware_stack = build_stack_behind_endpoint
  server.app.add_api_route(LIVE_PATH, live, methods=["GET"])
  server.app.add_api_route(METRICS_PATH, prometheus, methods=["GET"])
  log(f"serving {bundle.directory} ({bundle.config.model.backbone}/"
      f"{bundle.config.method}, n={limits.list_size}, H={limits.history_size}) on "
      f"http://{config.host}:{config.port}{api_lib.PATH}; batches of up to "
      f"{config.max_batch_size} lists, {config.batch_timeout_ms:g} ms batch timeout, "
      f"{config.workers} inference worker{'s' if config.workers > 1 else ''}")
  return server, drained


def serve(config: ServiceConfig, log: Callable[[str], None] = logging.info) -> None:
  """Serves ``config.checkpoint`` until SIGTERM or SIGINT, then drains and returns.

  Raises:
    DNRError: a bad config or checkpoint (one line), before any process starts; or
      an inference worker that could not start.
  """
  owned = metrics_lib.ENV not in os.environ
  directory = metrics_lib.use_directory()
  try:
    server, drained = build_server(config, log)
    state = {"draining": False}
    main_pid = os.getpid()

    def drain(signum, frame):
      del frame
      if os.getpid() != main_pid:
        # The HTTP process (forked from this one, so it inherits this handler)
        # raises the signal again after its own graceful shutdown: it is done.
        sys.exit(0)
      if state["draining"]:
        return
      state["draining"] = True
      name = signal.Signals(signum).name
      http = [p for p in multiprocessing.active_children()
              if p.name.startswith(_HTTP_PROCESS)]
      log(f"{name}: draining (no new connections; answering the requests in flight, "
          f"at most {config.drain_timeout_s:g}s)")
      # New connections are refused from here on; accepted ones are answered.
      for sock in getattr(server, "listening", ()):
        try:
          sock.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
      for p in http:
        try:
          os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
          pass
      deadline = time.time() + config.drain_timeout_s + 5
      for p in http:
        p.join(max(0.0, deadline - time.time()))
      drained.set()
      log("drained; stopping the inference workers")
      # LitServe's own shutdown path (its Ctrl-C handling) stops the worker and its
      # queues.
      raise KeyboardInterrupt

    previous = {s: signal.signal(s, drain) for s in server_lib.DRAIN_SIGNALS}
    try:
      server.run(host=config.host, port=config.port,
                 num_api_servers=config.http_processes,
                 generate_client_file=False, log_level=config.log_level)
    except KeyboardInterrupt:
      pass
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
      drained.set()
      # After a drain the children are gone already. After a failed start (a worker
      # that could not load) the healthy workers are not: once drained is set, a
      # SIGTERM stops them at once, rather than each waiting out the join.
      for p in multiprocessing.active_children():
        p.terminate()
      for p in multiprocessing.active_children():
        p.join(5)
        if p.is_alive():
          p.kill()
    log("stopped")
  finally:
    if owned:
      metrics_lib.remove_directory(directory)
      os.environ.pop(metrics_lib.ENV, None)
