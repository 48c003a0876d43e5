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
