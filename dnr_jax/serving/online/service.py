"""The online reranking service: a trained bundle behind HTTP, on LitServe.

``serve(ServiceConfig(checkpoint=RUN))`` answers ``POST /rerank`` (one list per
request, ``requests``'s format) with dynamic batching: LitServe's inference worker
takes up to ``max_batch_size`` waiting requests, or what arrived within
``batch_timeout_ms``, and scores them in one call of the training run's compiled
eval program (``runtime.Runner.evaluate_params``, as ``experiments.rerank`` does).
Batches are padded to the next power of two (each size compiled once, at start-up),
so a batch never recompiles.

Processes: LitServe runs the HTTP server (uvicorn) in a process of its own and one
inference worker per device, started by this (the main) process.

* A request is checked in the HTTP process (``requests.check_request``, through the
  endpoint's pydantic body): a bad one is answered 400 with ``{"error": "<field>:
  <problem>"}`` there and never joins a batch, so it cannot fail the requests batched
  with it. Malformed JSON is a 400 too.
* The port opens once the worker has loaded the reranker and compiled every batch
  size (LitServe starts its HTTP server after the workers are ready): until then a
  connection is refused, so give a Kubernetes-style startup probe room for the
  compile. Then ``GET /ready`` (readiness) and ``GET /healthz`` (liveness) answer 200;
  ``/ready`` answers 503 if the worker is not ready. ``GET /metrics``: Prometheus
  (``metrics``). ``GET /info``: the model.
* SIGTERM or SIGINT to the main process drains: the listening socket is closed (new
  connections are refused at once), the HTTP process answers the requests it holds
  (uvicorn's graceful shutdown, at most ``drain_timeout_s``), then the worker is
  stopped and the process exits with status 0. The worker ignores both signals until
  the drain is done (or its parent is gone), so a signal sent to the whole process
  group (Ctrl-C in a terminal, a container runtime's stop) cannot drop the requests in
  flight.
* No authentication: put the service behind your gateway's. (LitServe's
  ``LIT_SERVER_API_KEY`` is refused rather than silently ignored.)
"""

import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

import litserve as ls
from litserve.transport.process_transport import MPQueueTransport
import pydantic
import starlette.responses
from absl import logging

from dnr_jax import errors
from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online import requests as requests_lib

PATH = "/rerank"
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
    batch_timeout_ms: how long the batcher collects requests for one batch (> 0; it
      is also how long an idle worker blocks between polls of its queue: LitServe's
      batcher busy-waits at 0).
    max_candidates: the most candidates a request may send (0: the reranker's ``n``);
      those past ``n`` come back after the reranked ones, in upstream order.
    request_timeout_s: a request waiting longer than this for the worker gets 504.
    drain_timeout_s: at most this long to answer the requests in flight on SIGTERM.
    http_processes: HTTP server processes (LitServe's ``num_api_servers``): on a
      machine with cores to spare, more of them lift the request rate (the HTTP side,
      not the model, limits it: ``docs/serving.md``).
    log_level: the servers' log level (uvicorn's names: ``warning``, ``info``, ...).
  """
  checkpoint: str
  host: str = "127.0.0.1"
  port: int = 8000
  max_batch_size: int = 64
  batch_timeout_ms: float = 2.0
  max_candidates: int = 0
  request_timeout_s: float = 30.0
  drain_timeout_s: float = 30.0
  http_processes: int = 1
  log_level: str = "warning"

  def validate(self) -> None:
    if self.max_batch_size < 1 or self.max_batch_size & (self.max_batch_size - 1):
      raise errors.ConfigError(f"max_batch_size={self.max_batch_size} must be a power "
                               "of two (batches are padded to one)")
    if self.batch_timeout_ms <= 0:
      raise errors.ConfigError(f"batch_timeout_ms={self.batch_timeout_ms} must be > 0 "
                               "(at 0 LitServe's batcher spins a core while idle)")
    if self.max_candidates < 0:
      raise errors.ConfigError(f"max_candidates={self.max_candidates} must be >= 0")
    if not 1024 <= self.port <= 65535:
      raise errors.ConfigError(f"port={self.port} must be in 1024..65535")
    if self.host not in ("127.0.0.1", "0.0.0.0", "::"):
      raise errors.ConfigError(f"host={self.host!r}: LitServe listens on 127.0.0.1, "
                               "0.0.0.0 or ::")
    if self.http_processes < 1:
      raise errors.ConfigError(f"http_processes={self.http_processes} must be >= 1")
    if self.request_timeout_s <= 0 or self.drain_timeout_s <= 0:
      raise errors.ConfigError("request_timeout_s and drain_timeout_s must be > 0")


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
  """The padded batch sizes: powers of two up to ``max_batch_size``."""
  return tuple(1 << i for i in range(max_batch_size.bit_length()))


def _bucket(size: int, buckets: tuple[int, ...]) -> int:
  return next(b for b in buckets if b >= size)


# The limits the HTTP process checks bodies against. Set by ``serve`` in the main
# process before LitServe forks its HTTP processes, which inherit it; the pydantic
# body below is a module-level class (the worker unpickles it by name), so it cannot
# carry them itself.
_LIMITS: Optional[requests_lib.RequestLimits] = None


class RerankBody(pydantic.BaseModel):
  """One checked request (``requests.check_request``) as FastAPI's body type."""
  checked: Any

  @pydantic.model_validator(mode="before")
  @classmethod
  def _check(cls, data):
    if _LIMITS is None:
      raise ValueError("service: not configured (build_server sets the limits)")
    return {"checked": requests_lib.check_request(data, _LIMITS)}


def _error_line(exc) -> str:
  """The one line of a FastAPI validation error (a bad or malformed body)."""
  errs = exc.errors() if hasattr(exc, "errors") else []
  if not errs:
    return f"body: {exc}"
  e = errs[0]
  if e.get("type") == "json_invalid":
    return f"body: malformed JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
  if e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",):
    return "body: missing (send one list as a JSON object)"
  error = e.get("ctx", {}).get("error")
  if isinstance(error, requests_lib.RequestError):
    return str(error)
  loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
  return f"{loc}: {e.get('msg')}"


class RerankAPI(ls.LitAPI):
  """The reranker as LitServe's API: decode (already checked), batch, score, reply."""

  def __init__(self, config: ServiceConfig, bundle_dir: str,
               limits: requests_lib.RequestLimits, drained):
    super().__init__(max_batch_size=config.max_batch_size,
                     batch_timeout=config.batch_timeout_ms / 1000.0, api_path=PATH)
    self.config, self.bundle_dir, self.limits = config, bundle_dir, limits
    self.drained = drained
    self.buckets = bucket_sizes(config.max_batch_size)

  def setup(self, device):
    # The main process drains the HTTP side first; this worker must go on answering
    # until then, whatever signal the process group received.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, self._on_term)
    self.parent = os.getppid()
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
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
    logging.info("reranker %s (%s/%s) ready on %s: batch sizes %s compiled in %.1fs",
                 self.bundle_dir, bundle.config.model.backbone, bundle.config.method,
                 jax_device, list(self.buckets), time.time() - t0)

  def _on_term(self, signum, frame):
    del signum, frame
    # After the drain, or when the main process is gone (killed outright: nobody
    # will drain), a SIGTERM stops the worker; before, it is the main process's job.
    if self.drained.is_set() or os.getppid() != self.parent:
      sys.exit(0)

  def _score(self, batch):
    import numpy as np  # pylint: disable=g-import-not-at-top
    arrays, unknown = requests_lib.encode(batch, self.vocab, self.limits)
    size = _bucket(len(batch), self.buckets)
    pad = size - len(batch)
    padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              if pad else v for k, v in arrays.items()}
    _, logits = self.runner.evaluate_params(self.params, padded)
    logits = np.asarray(logits)[:len(batch)]
    return requests_lib.replies(batch, logits, arrays["mask"], unknown), unknown

  # (No ``from __future__ import annotations`` in this file: LitServe reads this
  # annotation as FastAPI's body type, and a string would make it a query field.)
  async def authorize(self) -> None:
    """No authentication (put the service behind your gateway's). Async, so FastAPI
    runs it on the event loop instead of handing every request to a thread (LitServe's
    default dependency is a sync function)."""

  def decode_request(self, request: RerankBody):
    return request.checked

  def batch(self, inputs):
    return list(inputs)

  def predict(self, x):
    out, unknown = self._score(x)
    m = metrics_lib.get()
    m.batch_size.observe(len(x))
    m.lists.inc(len(x))
    for column, counts in unknown.items():
      total = int(counts.sum())
      if total:
        m.unknown_ids.labels(column=column).inc(total)
    return out

  def unbatch(self, output):
    return output

  def encode_response(self, output):
    # The reply's JSON is made here, in the worker, and travels as a finished
    # response: the HTTP process (the busier one) then does not encode it again.
    return starlette.responses.Response(
        json.dumps(output, separators=(",", ":")).encode(),
        media_type="application/json")



class _PipeQueueServer(ls.LitServer):
  """LitServer with its request and response queues as pipes, not Manager queues.

  LitServe (0.2.x) passes every request and every reply through
  ``multiprocessing.Manager`` queues: each ``put`` and ``get`` is a round trip to
  the manager's own process, which on 2 CPU cores cost a quarter of a core and a
  fifth of the throughput at 32 concurrent clients (``docs/serving.md``).
  ``multiprocessing.Queue``s (pipes; created before the HTTP process is forked and
  the worker spawned, so both inherit them) behave the same for its loops. Its
  ``fast_queue=True`` (ZeroMQ replies) is no alternative here: in 0.2.19 the flag
  never reaches the transport (``TransportConfig`` gets an unknown keyword), and
  forced on, the replies never arrived. ``_init_manager`` and ``_start_server`` are
  LitServe's private methods: setup.py pins the release they were written against.

  ``_start_server`` also keeps the listening sockets (``listening``), so that the
  drain can shut them down: closing uvicorn's copy is not enough, since the main
  process and LitServe's manager process (forked after the socket was bound) hold
  copies too, and the port would go on queueing connections in a backlog that nobody
  accepts from any more. ``shutdown`` acts on the socket itself, in every process.

  A caveat of pipes: an HTTP process killed outright (SIGKILL) while writing to the
  request queue can leave it locked for the others; a drain never does that.
  """

  def _init_manager(self, num_api_servers):
    manager = super()._init_manager(num_api_servers)
    ctx = multiprocessing.get_context("spawn")
    for path in list(self.litapi_request_queues):
      self.litapi_request_queues[path] = ctx.Queue()
    self._transport = MPQueueTransport(manager,
                                       [ctx.Queue() for _ in range(num_api_servers)])
    return manager

  def _start_server(self, port, num_uvicorn_servers, log_level, sockets,
                    uvicorn_worker_type, **kwargs):
    self.listening = list(sockets)
    return super()._start_server(port, num_uvicorn_servers, log_level, sockets,
                                 uvicorn_worker_type, **kwargs)


class _RequestMetrics:
  """ASGI middleware: counts ``/rerank`` requests by status and times them."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope.get("path") != PATH:
      await self.app(scope, receive, send)
      return
    t0 = time.perf_counter()
    status = [499]   # nginx's "client closed request": no reply was started

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      m = metrics_lib.get()
      code = str(status[0])
      m.requests.labels(code=code).inc()
      if status[0] >= 400:
        m.errors.labels(code=code).inc()
      m.latency.observe(time.perf_counter() - t0)


def build_server(config: ServiceConfig, log: Callable[[str], None] = logging.info):
  """The ``litserve.LitServer`` of ``config`` (not started), and its drain event.

  Raises:
    DNRError: a bad config or checkpoint (one line), before any process starts.
  """
  global _LIMITS
  from fastapi.exceptions import RequestValidationError  # pylint: disable=g-import-not-at-top
  from fastapi.responses import JSONResponse, Response  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  config.validate()
  if os.environ.get("LIT_SERVER_API_KEY"):
    raise errors.ConfigError(
        "LIT_SERVER_API_KEY is set, but this service has no authentication (its "
        "requests would not be checked against it): unset it and put the service "
        "behind your gateway's authentication")
  bundle = bundle_lib.load_bundle(config.checkpoint)
  limits = requests_lib.RequestLimits.from_bundle(bundle, config.max_candidates or None)
  _LIMITS = limits
  drained = multiprocessing.get_context("spawn").Event()
  api = RerankAPI(config, bundle.directory, limits, drained)
  # One inference worker, on JAX's first local device (a GPU where there is one). JAX
  # is not started here: LitServe forks its HTTP process from this one, and a fork
  # of a process whose JAX runtime has threads can deadlock.
  server = _PipeQueueServer(
      api, accelerator="cpu", devices=1,
      timeout=config.request_timeout_s, healthcheck_path=READY_PATH,
      middlewares=[_RequestMetrics],
      # A body is refused (413) before it is parsed past this: room for the most
      # candidates and history ids a request may hold, at 256 bytes each.
      max_payload_size=65536 + 256 * (limits.max_candidates * (
          2 + len(limits.item_features)) + requests_lib.MAX_HISTORY),
      model_metadata={"checkpoint": bundle.directory,
                      "backbone": bundle.config.model.backbone,
                      "method": bundle.config.method,
                      "list_size": limits.list_size,
                      "history_size": limits.history_size,
                      "max_candidates": limits.max_candidates,
                      "score_transform": limits.score_transform,
                      "user_features": list(limits.user_features),
                      "item_features": list(limits.item_features)})

  async def bad_request(request, exc):
    del request
    return JSONResponse({"error": _error_line(exc)}, status_code=400)

  async def live():
    return {"status": "alive"}

  async def prometheus():
    body, content_type = metrics_lib.exposition()
    return Response(body, media_type=content_type)

  # uvicorn's graceful shutdown is the drain: bound it by the config.
  server.uvicorn_graceful_timeout = config.drain_timeout_s
  server.app.add_exception_handler(RequestValidationError, bad_request)
  server.app.add_api_route(LIVE_PATH, live, methods=["GET"])
  server.app.add_api_route(METRICS_PATH, prometheus, methods=["GET"])
  log(f"serving {bundle.directory} ({bundle.config.model.backbone}/"
      f"{bundle.config.method}, n={limits.list_size}, H={limits.history_size}) on "
      f"http://{config.host}:{config.port}{PATH}; batches of up to "
      f"{config.max_batch_size} lists, {config.batch_timeout_ms:g} ms batch timeout")
  return server, drained


def serve(config: ServiceConfig, log: Callable[[str], None] = logging.info) -> None:
  """Serves ``config.checkpoint`` until SIGTERM or SIGINT, then drains and returns.

  Raises:
    DNRError: a bad config or checkpoint (one line), before any process starts.
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
      log("drained; stopping the inference worker")
      # LitServe's own shutdown path (its Ctrl-C handling) stops the worker and its
      # queues.
      raise KeyboardInterrupt

    previous = {s: signal.signal(s, drain) for s in (signal.SIGTERM, signal.SIGINT)}
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
      for p in multiprocessing.active_children():
        p.join(5)
        if p.is_alive():
          p.kill()
    log("stopped")
  finally:
    if owned:
      metrics_lib.remove_directory(directory)
      os.environ.pop(metrics_lib.ENV, None)
