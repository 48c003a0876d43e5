"""How the inference worker gathers a batch: a queue delay counted from the oldest
request's arrival, as Triton's dynamic batcher counts it.

LitServe's batched loop (0.2.x) starts its ``batch_timeout`` when the worker comes
back for the next batch: however long the requests already queued have waited while
the previous batch was scored, the worker waits the whole timeout again for company
(unless ``max_batch_size`` requests are there). Under steady load that adds the
timeout to every batch, a dead time of the only stage that scores. ``QueueDelayLoop``
gathers the batch the way Triton's ``max_queue_delay_microseconds`` does: the timeout
is how long the *oldest* request of the batch may have been delayed since it was
queued. A request that finds the worker idle still waits up to the timeout for
company; requests that queued behind a busy worker go to it at once, with whatever
else is queued (up to ``max_batch_size``).

It also waits for the first request in one blocking read, rather than returning an
empty batch every ``batch_timeout``: an idle worker sleeps instead of polling.

The queued messages are LitServe's ``(response_queue_id, uid, timestamp, request)``,
the timestamp ``time.monotonic()`` when the HTTP process queued it: one clock for
every process of the machine (Linux's ``CLOCK_MONOTONIC``).
"""

from __future__ import annotations

import queue
import time

from litserve.loops import BatchedLoop

# LitServe's end-of-work message on a request queue. The release setup.py pins
# defines it but never sends it (it stops workers by terminating them); should one
# come, the worker exits, as LitServe's own loop would.
END_OF_WORK = (None, None, None, None)

# How long an idle worker blocks for the first request before its loop comes round.
# Bounded because a signal that one of the worker's other threads (XLA's) takes is
# handled only once the main thread returns from the wait.
IDLE_WAIT_S = 0.5


def gather(request_queue, *, max_batch_size: int, batch_timeout: float,
           request_timeout: float | None, idle_wait: float = IDLE_WAIT_S,
           clock=time.monotonic):
  """One batch off ``request_queue``.

  Args:
    request_queue: what the HTTP processes put the requests on (``get(timeout=)``,
      ``get_nowait()``, as ``queue.Queue``).
    max_batch_size: at most this many requests.
    batch_timeout: seconds the oldest request of the batch may wait for company,
      counted from when it was queued.
    request_timeout: a request queued longer than this (seconds) is not scored
      but answered as timed out; None: never.
    idle_wait: seconds to block for the first request; then an empty batch.
    clock: the clock the timestamps were taken with.

  Returns:
    ``(batch, timed_out)``: ``[(response_queue_id, uid, request), ...]`` in the
    order queued, and ``[(response_queue_id, uid), ...]``.

  Raises:
    SystemExit: ``END_OF_WORK`` was read (the batch read so far is dropped with it,
      as LitServe's own loop drops it).
  """
  batch, timed_out = [], []
  try:
    item = request_queue.get(timeout=idle_wait)
  except queue.Empty:
    return batch, timed_out
  deadline = float("inf")
  while True:
    if item == END_OF_WORK:
      raise SystemExit(0)
    response_queue_id, uid, queued_at, request = item
    now = clock()
    # With several HTTP processes, a message read later may have queued earlier.
    deadline = min(deadline, queued_at + batch_timeout)
    if request_timeout is not None and now - queued_at > request_timeout:
      timed_out.append((response_queue_id, uid))
    else:
      batch.append((response_queue_id, uid, request))
    if len(batch) >= max_batch_size:
      break
    try:
      item = request_queue.get_nowait()   # what is queued already joins at once
    except queue.Empty:
      remaining = deadline - now
      if remaining <= 0:
        break
      try:
        item = request_queue.get(timeout=remaining)
      except queue.Empty:
        break
  return batch, timed_out


class QueueDelayLoop(BatchedLoop):
  """LitServe's batched loop, its batches gathered by ``gather``."""

  def get_batch_requests(self, lit_api, request_queue, transport):
    del transport
    # LitServe's batcher sends a "started" status per request here, used only to
    # fail the requests of a worker it restarts. The service never restarts
    # workers (and the monitoring thread that would, blocks the drain signals that
    # a restarted worker would inherit).
    if getattr(self, "_restart_workers", False):
      raise RuntimeError("QueueDelayLoop does not support LitServer(restart_workers=True)")
    timeout = lit_api.request_timeout
    return gather(request_queue, max_batch_size=lit_api.max_batch_size,
                  batch_timeout=lit_api.batch_timeout,
                  request_timeout=None if timeout in (-1, False, None) else timeout)
