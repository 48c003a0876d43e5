"""LitServe's server as the service runs it: pipe queues, a drainable socket, metrics.

``PipeQueueServer`` is ``litserve.LitServer`` with its Manager queues replaced by
pipes (``pipes``) and its listening sockets kept for the drain.
"""

import gc
import multiprocessing
import signal
import time

import litserve as ls
from litserve.utils import WorkerSetupStatus
from starlette.middleware.gzip import GZipMiddleware

from dnr_jax import errors

from dnr_jax.serving.online import pipes

# The signals that drain the service (``service.serve``).
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PipeQueueServer(ls.LitServer):
  """LitServer with its request and response queues as pipes, not Manager queues.

  LitServe (0.2.x) passes every request and every reply through
  ``multiprocessing.Manager`` queues: each ``put`` and ``get`` is a round trip to
  the manager's own process. Here the requests go through one ``pipes.RequestPipe``
  and the replies through ``pipes.ReplyTransport`` (created before the HTTP
  processes are forked and the workers spawned, so all inherit them), written and read
  without helper threads (why: ``docs/serving.md``, "Why LitServe"; what it changed:
  ``docs/serving_tuning.md``, round 1). Its
  ``fast_queue=True`` (ZeroMQ replies) is no alternative here: in 0.2.19 the flag
  never reaches the transport (``TransportConfig`` gets an unknown keyword), and
  forced on, the replies never arrived. ``_init_manager``, ``_start_server``,
  ``_start_worker_monitoring`` and ``_register_middleware`` are LitServe's private
  methods: setup.py pins the release they were written against.

  ``_start_server`` also keeps the listening sockets (``listening``), so that the
  drain can shut them down: closing uvicorn's copy is not enough, since the main
  process and LitServe's manager process (forked after the socket was bound) hold
  copies too, and the port would go on queueing connections in a backlog that nobody
  accepts from any more. ``shutdown`` acts on the socket itself, in every process.

  ``_start_worker_monitoring`` starts LitServe's monitoring thread with SIGTERM and
  SIGINT blocked, so that only the main thread can take them (below).

  A caveat of pipes: an HTTP process killed outright (SIGKILL) while writing to the
  request pipe can leave it locked for the others; a drain never does that.
  """

  def _init_manager(self, num_api_servers):
    manager = super()._init_manager(num_api_servers)
    ctx = multiprocessing.get_context("spawn")
    for path in list(self.litapi_request_queues):
      self.litapi_request_queues[path] = pipes.RequestPipe(ctx)
    self._transport = pipes.ReplyTransport(num_api_servers, ctx)
    return manager

  def _register_middleware(self):
    # LitServe puts GZip in front of every non-streaming server. A reply here is one
    # list: about 700 bytes for 20 candidates, under GZip's 1,000-byte threshold, so
    # GZip only adds a layer to every reply; a longer list would be compressed by the
    # busiest process to save a few hundred bytes on a ranking system's internal link.
    self.middlewares = [m for m in self.middlewares
                        if (m[0] if isinstance(m, tuple) else m) is not GZipMiddleware]
    super()._register_middleware()

  def verify_worker_status(self):
    # LitServe's waits for one READY worker: here the port opens once every worker
    # is ready, so that a ready service serves at its full rate, and a worker that
    # cannot start stops the start. LitServe's also waits for a READY or ERROR
    # status only: a worker that dies without one (killed for memory, a crash inside
    # XLA) would leave it waiting forever, and its ERROR is a bare RuntimeError.
    # Either is one line here, naming what to read.
    while not all(v == WorkerSetupStatus.READY
                  for v in self.workers_setup_status.values()):
      failed = any(v == WorkerSetupStatus.ERROR
                   for v in self.workers_setup_status.values())
      dead = [p for p in self.inference_workers if not p.is_alive()]
      if failed or dead:
        how = (f"exited with status {dead[0].exitcode}" if dead and not failed
               else "failed")
        raise errors.DNRError(
            f"an inference worker {how} while loading the reranker and compiling "
            "its batch sizes (its error, if it printed one, is above); nothing was "
            "served")
      time.sleep(0.05)

  def _start_worker_monitoring(self, *args, **kwargs):
    # The main process waits out the service in LitServe's ``_shutdown_event.wait()``,
    # a blocking read that only a signal taken by the main thread interrupts. The
    # kernel hands a SIGTERM to any thread that does not block it, and it goes to
    # the monitoring thread whenever the main thread has a signal pending already
    # (a SIGCONT just after a SIGSTOP, say): Python then runs the drain handler only
    # when the main thread next wakes, which here is never, and the SIGTERM is lost.
    # A thread inherits the mask of the thread that starts it.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, DRAIN_SIGNALS)
    try:
      return super()._start_worker_monitoring(*args, **kwargs)
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

  def _start_server(self, port, num_uvicorn_servers, log_level, sockets,
                    uvicorn_worker_type, **kwargs):
    self.listening = list(sockets)
    # The HTTP processes are forked from here: everything imported so far moves out
    # of the collector's reach, so that a full collection under load walks only the
    # objects made since (gc.freeze's documented use before fork).
    gc.collect()
    gc.freeze()
    return super()._start_server(port, num_uvicorn_servers, log_level, sockets,
                                 uvicorn_worker_type, **kwargs)
