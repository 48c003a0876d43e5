"""LitServe's server as the service runs it: pipe queues, a drainable socket, metrics.

``PipeQueueServer`` is ``litserve.LitServer`` with its Manager queues replaced by
pipes and its listening sockets kept for the drain; ``RequestMetrics`` is the ASGI
middleware that counts and times ``POST /rerank``.
"""

import multiprocessing
import time

import litserve as ls
from litserve.transport.process_transport import MPQueueTransport
from litserve.utils import WorkerSetupStatus

from dnr_jax import errors

from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online.api import PATH


class PipeQueueServer(ls.LitServer):
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

  def verify_worker_status(self):
    # LitServe's waits for a READY or ERROR status; a worker that dies without one
    # (killed for memory, a crash inside XLA) would leave it waiting forever, and its
    # ERROR is a bare RuntimeError. Either is one line here, naming what to read.
    while not any(v == WorkerSetupStatus.READY
                  for v in self.workers_setup_status.values()):
      failed = any(v == WorkerSetupStatus.ERROR
                   for v in self.workers_setup_status.values())
      dead = [p for p in self.inference_workers if not p.is_alive()]
      if failed or dead:
        how = (f"exited with status {dead[0].exitcode}" if dead and not failed
               else "failed")
        raise errors.DNRError(
            f"the inference worker {how} while loading the reranker and compiling "
            "its batch sizes (its error, if it printed one, is above); nothing was "
            "served")
      time.sleep(0.05)

  def _start_server(self, port, num_uvicorn_servers, log_level, sockets,
                    uvicorn_worker_type, **kwargs):
    self.listening = list(sockets)
    return super()._start_server(port, num_uvicorn_servers, log_level, sockets,
                                 uvicorn_worker_type, **kwargs)


class RequestMetrics:
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
