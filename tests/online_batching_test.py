"""How the inference worker gathers a batch (``online.batching``): the queue delay is
counted from the oldest request's arrival, not from when the worker asks.

No processes: a ``queue.Queue`` stands in for the request pipe, holding LitServe's
``(response_queue_id, uid, queued_at, request)`` messages.
"""

import queue
import threading
import time

import pytest

pytest.importorskip("litserve")

from dnr_jax.serving.online import batching  # pylint: disable=g-import-not-at-top


def _queue(*ages, now=None):
  """A queue of requests ``uid=i`` queued ``ages[i]`` seconds ago."""
  now = time.monotonic() if now is None else now
  q = queue.Queue()
  for i, age in enumerate(ages):
    q.put((0, str(i), now - age, f"r{i}"))
  return q


def _uids(batch):
  return [uid for _, uid, _ in batch]


def test_requests_that_waited_behind_a_busy_worker_go_at_once():
  # Queued 6 s ago, past the 5 s delay: no further wait, everything queued joins.
  q = _queue(6.0, 5.5, 5.0)
  t0 = time.monotonic()
  batch, timed_out = batching.gather(q, max_batch_size=64, batch_timeout=5.0,
                                     request_timeout=30)
  assert time.monotonic() - t0 < 1.0
  assert _uids(batch) == ["0", "1", "2"] and timed_out == []
  assert batch[0] == (0, "0", "r0")


def test_a_fresh_request_waits_for_company_until_its_own_delay_ends():
  q = _queue(0.0)
  later = threading.Timer(0.1, lambda: q.put((1, "late", time.monotonic(), "r")))
  later.start()
  t0 = time.monotonic()
  batch, _ = batching.gather(q, max_batch_size=64, batch_timeout=0.6,
                             request_timeout=None)
  waited = time.monotonic() - t0
  later.join()
  assert _uids(batch) == ["0", "late"]
  # It waited out the first request's 0.6 s, not 0.6 s from the second's arrival.
  assert 0.5 < waited < 0.68


def test_the_delay_counts_from_the_oldest_request_not_from_the_ask():
  # Queued 1 s before the worker asks, with a 1.2 s delay: 0.2 s left to wait
  # (LitServe's own batcher would wait 1.2 s from the ask).
  q = _queue(1.0)
  t0 = time.monotonic()
  batch, _ = batching.gather(q, max_batch_size=64, batch_timeout=1.2,
                             request_timeout=None)
  assert _uids(batch) == ["0"]
  assert 0.1 < time.monotonic() - t0 < 0.8


def test_a_full_batch_goes_without_waiting_and_leaves_the_rest_queued():
  q = _queue(0.0, 0.0, 0.0, 0.0, 0.0)
  t0 = time.monotonic()
  batch, _ = batching.gather(q, max_batch_size=3, batch_timeout=5.0,
                             request_timeout=None)
  assert time.monotonic() - t0 < 0.5
  assert _uids(batch) == ["0", "1", "2"] and q.qsize() == 2


def test_zero_delay_takes_what_is_queued():
  q = _queue(0.0, 0.0)
  batch, _ = batching.gather(q, max_batch_size=64, batch_timeout=0.0,
                             request_timeout=None)
  assert _uids(batch) == ["0", "1"]


def test_a_request_queued_past_the_request_timeout_is_answered_not_scored():
  q = _queue(40.0, 0.0)
  batch, timed_out = batching.gather(q, max_batch_size=64, batch_timeout=0.0,
                                     request_timeout=30.0)
  assert _uids(batch) == ["1"] and timed_out == [(0, "0")]


def test_an_idle_worker_blocks_then_returns_an_empty_batch():
  t0 = time.monotonic()
  assert batching.gather(queue.Queue(), max_batch_size=64, batch_timeout=0.001,
                         request_timeout=None, idle_wait=0.1) == ([], [])
  assert time.monotonic() - t0 >= 0.09


def test_the_end_of_work_message_stops_the_worker():
  q = _queue(0.0)
  q.put(batching.END_OF_WORK)
  with pytest.raises(SystemExit):
    batching.gather(q, max_batch_size=64, batch_timeout=1.0, request_timeout=None)


def test_the_loop_reads_its_settings_from_the_api():
  class Api:
    max_batch_size, batch_timeout, request_timeout = 2, 0.0, -1

  q = _queue(100.0, 0.0, 0.0)
  batch, timed_out = batching.QueueDelayLoop().get_batch_requests(Api(), q, None)
  # request_timeout -1 (LitServe's "never"): the old request is scored.
  assert _uids(batch) == ["0", "1"] and timed_out == []


def test_an_earlier_request_read_later_sets_the_deadline():
  # Two HTTP processes: the message read second had queued first, past its delay.
  now = time.monotonic()
  q = queue.Queue()
  q.put((0, "new", now, "a"))
  q.put((1, "old", now - 5.0, "b"))
  t0 = time.monotonic()
  batch, _ = batching.gather(q, max_batch_size=64, batch_timeout=2.0,
                             request_timeout=None)
  assert _uids(batch) == ["new", "old"] and time.monotonic() - t0 < 1.0


@pytest.mark.filterwarnings("ignore:The LitServer has both batch and unbatch")
def test_the_service_api_batches_with_this_loop_even_one_list_at_a_time():
  # LitServe would give max_batch_size=1 its unbatched loop, which hands predict a
  # single request instead of a batch.
  from dnr_jax.serving.online import api  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.online import requests  # pylint: disable=g-import-not-at-top
  limits = requests.RequestLimits(list_size=4, history_size=4, max_candidates=4)
  for size in (1, 64):
    rerank = api.RerankAPI("unused", limits, threading.Event(), max_batch_size=size,
                           batch_timeout_ms=1.0)
    assert isinstance(rerank.loop, batching.QueueDelayLoop)
