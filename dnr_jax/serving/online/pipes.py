"""The service's queues between its HTTP processes and the inference worker: pipes
written directly and read from the HTTP process's event loop.

LitServe (0.2.x) moves each request and each reply through a ``multiprocessing``
queue. On the HTTP side that costs two thread hand-offs per request: ``put`` wakes
the queue's feeder thread, which pickles and writes; and the reply is read by
``asyncio.to_thread(queue.get)``, a thread-pool round trip per reply. Here:

* ``RequestPipe`` (HTTP processes -> worker): ``put`` pickles and writes the request
  on the calling thread; the worker's batcher reads it with ``get(timeout=...)``, as
  from a queue.
* ``ReplyTransport`` (worker -> each HTTP process; LitServe's ``MessageTransport``):
  the worker writes each reply on its own thread; each HTTP process watches its pipe
  with the event loop (``add_reader``), so a reply becomes ready on the loop without a
  thread.

Writes are whole messages under a lock (several HTTP processes share the request
pipe), and each pipe's buffer is enlarged to ``PIPE_BYTES``, so that a burst of
requests waits in the kernel rather than blocking the writer: a write blocks only
while the buffer is full, i.e. while the worker is that far behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import queue
from multiprocessing.reduction import ForkingPickler
import pickle
from typing import Any, Optional

from litserve.transport.base import MessageTransport

# About 1,000 requests of a 20-candidate list; Linux's default pipe is 64 KiB. Raised
# only as far as the system allows (/proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _pipe(ctx):
  reader, writer = ctx.Pipe(duplex=False)
  for size in (PIPE_BYTES, PIPE_BYTES // 4):
    try:
      fcntl.fcntl(writer.fileno(), _F_SETPIPE_SZ, size)
      break
    except OSError:   # above the system's limit: keep the default
      continue
  return reader, writer


def _dumps(item) -> bytes:
  return bytes(ForkingPickler.dumps(item))


class RequestPipe:
  """A request queue as one pipe: ``put`` from any HTTP process, ``get`` in the
  worker. The subset of ``multiprocessing.Queue`` that LitServe's loops use."""

  def __init__(self, ctx=None):
    ctx = ctx or multiprocessing.get_context("spawn")
    self._reader, self._writer = _pipe(ctx)
    self._wlock, self._rlock = ctx.Lock(), ctx.Lock()

  def put(self, item: Any, block: bool = True, timeout: Optional[float] = None):
    del block, timeout
    data = _dumps(item)
    with self._wlock:
      self._writer.send_bytes(data)

  put_nowait = put

  def get(self, block: bool = True, timeout: Optional[float] = None):
    wait = None if block and timeout is None else (max(timeout, 0.0) if block else 0.0)
    if not self._rlock.acquire(True, wait):
      raise queue.Empty
    try:
      if wait is not None and not self._reader.poll(wait):
        raise queue.Empty
      data = self._reader.recv_bytes()
    finally:
      self._rlock.release()
    return pickle.loads(data)

  def get_nowait(self):
    return self.get(block=False)


class ReplyTransport(MessageTransport):
  """LitServe's reply transport over one pipe per HTTP process (``consumer_id``)."""

  def __init__(self, num_consumers: int, ctx=None):
    ctx = ctx or multiprocessing.get_context("spawn")
    pipes = [_pipe(ctx) for _ in range(num_consumers)]
    self._readers = [r for r, _ in pipes]
    self._writers = [w for _, w in pipes]
    self._locks = [ctx.Lock() for _ in range(num_consumers)]
    self._closed = False
    self._inbox: Optional[asyncio.Queue] = None

  def send(self, item: Any, consumer_id: int) -> None:
    data = _dumps(item)
    with self._locks[consumer_id]:
      self._writers[consumer_id].send_bytes(data)

  def _watch(self, consumer_id: int) -> asyncio.Queue:
    inbox = asyncio.Queue()
    reader = self._readers[consumer_id]

    def on_readable():
      # Every whole message now in the pipe; a message being written is waited for
      # (its writer holds the lock only for one write of a few KB).
      try:
        while reader.poll(0):
          inbox.put_nowait(pickle.loads(reader.recv_bytes()))
      except (EOFError, OSError):   # the worker is gone: stop watching
        asyncio.get_running_loop().remove_reader(reader.fileno())
        inbox.put_nowait(None)

    asyncio.get_running_loop().add_reader(reader.fileno(), on_readable)
    return inbox

  async def areceive(self, consumer_id: int, timeout: Optional[float] = None,
                     block: bool = True) -> Any:
    del block
    if self._closed:
      raise asyncio.CancelledError("transport closed")
    if self._inbox is None:
      self._inbox = self._watch(consumer_id)
    if not self._inbox.empty():   # a batch's replies arrive together
      return self._inbox.get_nowait()
    try:
      return await asyncio.wait_for(self._inbox.get(), 1.0 if timeout is None
                                    else min(timeout, 1.0))
    except asyncio.TimeoutError:
      if self._closed:
        raise asyncio.CancelledError("transport closed") from None
      return None

  def close(self, send_sentinel: bool = True) -> None:
    self._closed = True
    if send_sentinel:
      for i in range(len(self._writers)):
        try:
          self.send(None, i)
        except (OSError, ValueError):
          pass
