"""The service's request pipe and reply transport (serving/online/pipes.py), between
real processes: what LitServe's loops rely on from a queue, in order and complete,
with bursts larger than a default pipe holds."""

import asyncio
import multiprocessing
import os
import queue
import struct
import threading

import pytest

pytest.importorskip("litserve")

from dnr_jax.serving.online import pipes  # pylint: disable=g-import-not-at-top

CTX = multiprocessing.get_context("spawn")
# A burst of replies the size of ~1,000 lists: far past Linux's default 64 KiB pipe.
BURST, PAYLOAD = 1000, 600


def _echo_worker(requests, transport, count):
  """The inference worker's side: read ``count`` requests, reply to each at the
  consumer the request names, in order, as fast as they come."""
  for _ in range(count):
    consumer, uid, body = requests.get(timeout=30)
    transport.send((uid, body), consumer)


async def _receive(transport, consumer, count):
  got = []
  while len(got) < count:
    item = await transport.areceive(consumer, timeout=30)
    if item is not None:
      got.append(item)
  return got


def test_requests_and_replies_cross_processes_in_order():
  requests = pipes.RequestPipe(CTX)
  transport = pipes.ReplyTransport(2, CTX)
  worker = CTX.Process(target=_echo_worker, args=(requests, transport, 2 * BURST))
  worker.start()
  try:
    sent = {0: [], 1: []}
    for i in range(2 * BURST):
      consumer = i % 2
      body = ("x" * PAYLOAD, i)
      requests.put((consumer, f"uid{i}", body))
      sent[consumer].append((f"uid{i}", body))
    # Each HTTP process reads only its own replies, all of them, in order.
    assert asyncio.run(_receive(transport, 0, BURST)) == sent[0]
    assert asyncio.run(_receive(_fresh_reader(transport), 1, BURST)) == sent[1]
  finally:
    worker.join(30)
    if worker.is_alive():
      worker.kill()
  assert worker.exitcode == 0


def _fresh_reader(transport):
  # A forked HTTP process starts with no event-loop watch of its own; emulate that
  # for the second consumer, read on a second event loop.
  transport._inbox = None   # pylint: disable=protected-access
  return transport


def test_request_pipe_get_times_out_like_a_queue():
  requests = pipes.RequestPipe(CTX)
  with pytest.raises(queue.Empty):
    requests.get(timeout=0.01)
  with pytest.raises(queue.Empty):
    requests.get_nowait()
  requests.put({"a": 1})
  assert requests.get_nowait() == {"a": 1}
  requests.put(None)   # LitServe's stop sentinel is a value like any other
  assert requests.get(timeout=1) is None


def test_reply_transport_timeout_and_close():
  transport = pipes.ReplyTransport(1, CTX)

  async def receive_nothing():
    return await transport.areceive(0, timeout=0.05)

  assert asyncio.run(receive_nothing()) is None
  transport._inbox = None   # pylint: disable=protected-access  (a new event loop)
  transport.close(send_sentinel=True)

  async def receive_closed():
    return await transport.areceive(0, timeout=0.05)

  with pytest.raises(asyncio.CancelledError):
    asyncio.run(receive_closed())


def _count_writes():
  writes = []
  write = pipes._write_all   # pylint: disable=protected-access

  def counted(fd, data):
    writes.append(len(data))
    write(fd, data)
  return writes, counted


def _read_and_check(requests, expected):
  # The worker's side: Connection.recv_bytes reads the coalesced messages one by one.
  got = [requests.get(timeout=30) for _ in range(len(expected))]
  if sorted(got, key=repr) != sorted(expected, key=repr):
    raise SystemExit(f"got {got!r:.300}")
  for name in {e[0] for e in expected}:   # each sender's requests in its order
    if [g for g in got if g[0] == name] != [e for e in expected if e[0] == name]:
      raise SystemExit(f"{name}: out of order")


def test_requests_put_in_one_event_loop_turn_go_in_one_write(monkeypatch):
  requests = pipes.RequestPipe(CTX)
  writes, counted = _count_writes()
  monkeypatch.setattr(pipes, "_write_all", counted)
  big = "y" * 100_000   # past the pipe's atomic size, and past one default pipe
  expected = [("a", i, big if i == 2 else "x") for i in range(5)] + [("a", 5, "after")]

  async def burst():
    for item in expected[:5]:
      requests.put(item)
    assert not writes      # nothing written before the turn ends
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    requests.put(expected[5])  # a later turn: a write of its own
    await asyncio.sleep(0)

  worker = CTX.Process(target=_read_and_check, args=(requests, expected))
  worker.start()
  asyncio.run(burst())
  worker.join(30)
  assert worker.exitcode == 0
  assert len(writes) == 2 and writes[0] > 100_000


def test_event_loops_in_threads_share_the_request_pipe():
  # LitServe's thread mode: one event loop per thread, one pipe for all.
  requests = pipes.RequestPipe(CTX)
  expected = [(name, i) for name in "ab" for i in range(300)]

  def loop_thread(name):
    async def put_all():
      for i in range(300):
        requests.put((name, i))
        if i % 7 == 0:
          await asyncio.sleep(0)
    asyncio.run(put_all())

  worker = CTX.Process(target=_read_and_check, args=(requests, expected))
  worker.start()
  threads = [threading.Thread(target=loop_thread, args=(n,)) for n in "ab"]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  worker.join(30)
  assert worker.exitcode == 0


def test_a_request_too_large_to_frame_is_refused_at_put(monkeypatch):
  requests = pipes.RequestPipe(CTX)
  monkeypatch.setattr(pipes, "_MAX_FRAMED", 100)

  async def put():
    requests.put("z" * 200)

  with pytest.raises(ValueError, match="too large to queue"):
    asyncio.run(put())
  requests.put("fits")
  assert requests.get(timeout=5) == "fits"


def _connection_bytes(messages):
  """The bytes ``Connection.send_bytes`` puts in a pipe for ``messages``."""
  reader, writer = CTX.Pipe(duplex=False)
  for m in messages:
    writer.send_bytes(m)
  writer.close()
  out = b""
  while chunk := os.read(reader.fileno(), 1 << 16):
    out += chunk
  return out


def test_frames_are_split_however_the_bytes_arrive():
  messages = [b"", b"a", b"bc" * 5000, b"d"]
  # Connection's header for a message over 2 GiB (-1, then 8 bytes of length), on a
  # short message: the parser must read that form too.
  stream = _connection_bytes(messages) + struct.pack("!iQ", -1, 3) + b"xyz"
  for cut in (1, 3, 4, 5, 7, 11, 4096, len(stream)):
    frames = pipes._Frames()   # pylint: disable=protected-access
    got = []
    for start in range(0, len(stream), cut):
      frames.feed(stream[start:start + cut])
      while (m := frames.pop()) is not None:
        got.append(m)
    assert got == messages + [b"xyz"], cut
    assert frames.pop() is None


def test_a_reply_that_cannot_be_read_does_not_hold_back_the_others():
  transport = pipes.ReplyTransport(1, CTX)
  transport._writers[0].send_bytes(b"not a pickle")   # pylint: disable=protected-access
  transport.send(("uid-1", "ok"), 0)

  async def receive():
    return await transport.areceive(0, timeout=5)

  assert asyncio.run(receive()) == ("uid-1", "ok")
