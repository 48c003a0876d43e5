"""The service's request pipe and reply transport (serving/online/pipes.py), between
real processes: what LitServe's loops rely on from a queue, in order and complete,
with bursts larger than a default pipe holds."""

import asyncio
import multiprocessing
import queue

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


def test_requests_put_in_one_event_loop_turn_go_in_one_write(monkeypatch):
  requests = pipes.RequestPipe(CTX)
  writes, counted = _count_writes()
  monkeypatch.setattr(pipes, "_write_all", counted)
  big = "y" * 100_000   # past the pipe's atomic size, and past one default pipe

  async def burst():
    for i in range(5):
      requests.put((i, big if i == 2 else "x"))
    assert not writes      # nothing written before the turn ends
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    requests.put("after")  # a later turn: a write of its own
    await asyncio.sleep(0)

  worker = CTX.Process(target=_read_and_check, args=(requests, 6))
  worker.start()
  asyncio.run(burst())
  worker.join(30)
  assert worker.exitcode == 0
  assert len(writes) == 2 and writes[0] > 100_000


def _read_and_check(requests, count):
  # The worker's side: Connection.recv_bytes reads the coalesced messages one by one.
  got = [requests.get(timeout=30) for _ in range(count)]
  expected = [(i, "y" * 100_000 if i == 2 else "x") for i in range(5)] + ["after"]
  if got != expected:
    raise SystemExit(f"got {got!r:.200}")


def test_frames_are_split_however_the_bytes_arrive():
  messages = [b"", b"a", b"bc" * 5000, b"d"]
  stream = pipes._framed(messages)   # pylint: disable=protected-access
  for cut in (1, 3, 4, 5, 7, 4096, len(stream)):
    frames = pipes._Frames()   # pylint: disable=protected-access
    got = []
    for start in range(0, len(stream), cut):
      frames.feed(stream[start:start + cut])
      while (m := frames.pop()) is not None:
        got.append(m)
    assert got == messages, cut
    assert frames.pop() is None
