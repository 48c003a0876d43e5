"""The service's queues between its HTTP processes and the inference workers: pipes
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

The HTTP process, the busiest of the service's processes, batches its side of both
pipes: the requests ``put`` during one turn of its event loop go to the worker in one
write when the turn ends (the worker then finds them together, and its batches fill),
and each wake-up of its reply watch reads every reply waiting in one read (``_Frames``
splits them). Both keep ``multiprocessing.Connection``'s framing, so the worker reads
and writes with ``Connection`` as it is.
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import queue
import pickle
import struct
from typing import Any, Optional

from absl import logging

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


# Connection.send_bytes's framing: a 4-byte big-endian signed length, or -1 and an
# 8-byte length for a message past 2 GiB (a request is refused long before that).
_MAX_FRAMED = 0x7fffffff


def _framed(messages) -> bytes:
  return b"".join(struct.pack("!i", len(m)) + m for m in messages)


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _dumps(item) -> bytes:
  # Plain pickle: the messages are data (requests, finished replies, errors), none of
  # the process objects ForkingPickler exists for, and it costs a third less.
  return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)


class _Frames:
  """Whole framed messages out of the bytes read from a pipe so far."""

  def __init__(self):
    self._buf, self._at = bytearray(), 0

  def feed(self, data: bytes) -> None:
    if self._at:   # drop what was read, once, rather than per message
      del self._buf[:self._at]
      self._at = 0
    self._buf += data

  def pop(self) -> Optional[bytes]:
    """The next whole message, or None until the rest of it is fed."""
    have = len(self._buf) - self._at
    if have < 4:
      return None
    size, = struct.unpack_from("!i", self._buf, self._at)
    header = 4
    if size == -1:   # Connection's header of a message over 2 GiB: 8 more bytes
      if have < 12:
        return None
      size, = struct.unpack_from("!Q", self._buf, self._at + 4)
      header = 12
    end = self._at + header + size
    if len(self._buf) < end:
      return None
    message = bytes(self._buf[self._at + header:end])
    self._at = end
    return message


class RequestPipe:
  """A request queue as one pipe: ``put`` from any HTTP process, ``get`` in the
  worker. The subset of ``multiprocessing.Queue`` that LitServe's loops use."""

  def __init__(self, ctx=None):
    ctx = ctx or multiprocessing.get_context("spawn")
    self._reader, self._writer = _pipe(ctx)
    self._wlock, self._rlock = ctx.Lock(), ctx.Lock()
    # Per event loop (LitServe's thread mode runs one per thread), the messages its
    # current turn put; each loop touches only its own entry.
    self._pending: dict[asyncio.AbstractEventLoop, list[bytes]] = {}

  def __getstate__(self):
    return {**self.__dict__, "_pending": {}}

  def put(self, item: Any, block: bool = True, timeout: Optional[float] = None):
    """Writes at the end of the event loop's turn, with the turn's other requests; at
    once outside an event loop. A message that cannot be sent raises here."""
    del block, timeout
    data = _dumps(item)
    if len(data) > _MAX_FRAMED:
      raise ValueError(f"a request of {len(data)} bytes is too large to queue")
    try:
      loop = asyncio.get_running_loop()
    except RuntimeError:
      self._write([data])
      return
    pending = self._pending.get(loop)
    if pending is None:
      pending = self._pending[loop] = []
      loop.call_soon(self._flush, loop)
    pending.append(data)

  def _flush(self, loop) -> None:
    pending = self._pending.pop(loop, [])
    try:
      self._write(pending)
    except Exception:   # pylint: disable=broad-except
      # Every process holds the pipe's read end, so a write blocks rather than fails
      # while the service runs; it fails only once the pipe is closed (shutdown).
      # Those requests then get no reply: say so.
      logging.exception("service: %d request(s) not delivered to the inference "
                        "worker", len(pending))

  def _write(self, messages: list[bytes]) -> None:
    data = _framed(messages)
    with self._wlock:
      _write_all(self._writer.fileno(), data)

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
    fd = self._readers[consumer_id].fileno()
    frames = _Frames()

    def on_readable():
      # All the bytes waiting (this process is the pipe's only reader); a message
      # cut at the end waits for the rest in ``frames``.
      try:
        data = os.read(fd, PIPE_BYTES)
      except OSError:
        data = b""
      if not data:   # the worker is gone: stop watching
        asyncio.get_running_loop().remove_reader(fd)
        inbox.put_nowait(None)
        return
      frames.feed(data)
      while (message := frames.pop()) is not None:
        try:
          inbox.put_nowait(pickle.loads(message))
        except Exception:   # pylint: disable=broad-except
          # One reply that cannot be read must not hold back the others read with it.
          logging.exception("service: a reply from the inference worker could not "
                            "be read")

    asyncio.get_running_loop().add_reader(fd, on_readable)
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
