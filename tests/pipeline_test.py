"""Tests of the host input pipeline: epoch order, last batch, process shards, prefetch."""

import itertools
import threading
import time
import traceback

import numpy as np
import pytest

from dnr_jax.runtime import pipeline


def _split(n=10, list_size=3, history=2):
  """``n`` lists; list ``i`` has item id ``i + 1`` in every position (0 is padding)."""
  ids = np.arange(1, n + 1, dtype=np.int32)
  return pipeline.complete({
      "history": np.tile(ids[:, None], (1, history)),
      "history_mask": np.ones((n, history), bool),
      "items": np.tile(ids[:, None], (1, list_size)),
      "scores": np.full((n, list_size), 0.5, np.float32),
      "labels": np.zeros((n, list_size), np.float32),
      "mask": np.ones((n, list_size), bool)})


def _ids(b):
  return b["items"][:, 0].tolist()


def _order(arrays, **kw):
  return [i for b in pipeline.batches(arrays, 4, **kw) for i in _ids(b)]


def test_shuffle_is_per_epoch_and_reproducible():
  arrays = _split(64)
  first = _order(arrays, shuffle=True, seed=0, epoch=0)
  assert first == _order(arrays, shuffle=True, seed=0, epoch=0)
  assert first != _order(arrays, shuffle=True, seed=0, epoch=1)
  assert first != _order(arrays, shuffle=True, seed=1, epoch=0)
  assert _order(arrays, shuffle=False) == list(range(1, 65))


def test_padded_epoch_has_every_list_once():
  arrays = _split(10)
  out = list(pipeline.batches(arrays, 4, shuffle=True, seed=3, epoch=2))
  assert len(out) == pipeline.steps_per_epoch(arrays, 4, pad_last=True) == 3
  assert all(b[k].shape[0] == 4 for b in out for k in b)
  ids = [i for b in out for i in _ids(b)]
  assert sorted(i for i in ids if i) == list(range(1, 11))
  # The two filler lists of the last batch are pure padding: no candidate counts.
  last = out[-1]
  assert _ids(last)[2:] == [0, 0]
  assert not last["mask"][2:].any() and not last["history_mask"][2:].any()
  assert last["mask"][:2].all()


def test_unpadded_epoch_drops_the_partial_batch():
  arrays = _split(10)
  out = list(pipeline.batches(arrays, 4, shuffle=True, seed=3, epoch=2, pad_last=False))
  assert len(out) == pipeline.steps_per_epoch(arrays, 4, pad_last=False) == 2
  assert len({tuple((k, v.shape) for k, v in b.items()) for b in out}) == 1
  ids = [i for b in out for i in _ids(b)]
  assert len(set(ids)) == 8 and 0 not in ids


@pytest.mark.parametrize("pad_last", [True, False])
def test_process_shares_partition_each_global_batch(pad_last):
  arrays = _split(10)
  kw = dict(shuffle=True, seed=5, epoch=1, pad_last=pad_last)
  whole = list(pipeline.batches(arrays, 4, **kw))
  shares = [list(pipeline.batches(arrays, 4, process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert len(shares[0]) == len(shares[1]) == len(whole)
  for g, p0, p1 in zip(whole, *shares):
    assert p0["items"].shape[0] == p1["items"].shape[0] == 2
    real0, real1 = set(_ids(p0)) - {0}, set(_ids(p1)) - {0}
    assert not real0 & real1
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])


def test_batch_size_not_divisible_by_processes_fails_clearly():
  with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 2"):
    next(pipeline.batches(_split(), 5, shuffle=False, process_count=2))


def test_prefetch_keeps_order_and_overlaps_with_the_consumer():
  worker_ids, second_started = set(), threading.Event()

  def square(x):
    worker_ids.add(threading.get_ident())
    if x == 1:
      second_started.set()
    return x * x

  out = []
  for y in pipeline.prefetch(range(20), size=2, transform=square):
    if not out:
      # Item 1 is transformed while the consumer still holds item 0.
      assert second_started.wait(5)
    out.append(y)
  assert out == [x * x for x in range(20)]
  assert worker_ids and threading.get_ident() not in worker_ids


def test_prefetch_size_zero_is_a_plain_map():
  before = threading.active_count()
  callers = set()

  def f(x):
    callers.add(threading.get_ident())
    assert threading.active_count() == before
    return x + 1

  assert list(pipeline.prefetch(iter(range(5)), size=0, transform=f)) == [1, 2, 3, 4, 5]
  assert callers == {threading.get_ident()}


def test_prefetch_reraises_the_worker_exception():
  def third_fails(x):
    if x == 2:
      raise ValueError("bad item 2")
    return x

  got = []
  with pytest.raises(ValueError, match="bad item 2") as info:
    for y in pipeline.prefetch(range(10), size=2, transform=third_fails):
      got.append(y)
  assert got == [0, 1]
  # The worker's frames are kept in the traceback, so the failure points at its cause.
  assert "third_fails" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]


def _wait_for_threads(count, timeout=2.0):
  deadline = time.monotonic() + timeout
  while threading.active_count() > count and time.monotonic() < deadline:
    time.sleep(0.01)
  return threading.active_count()


def test_prefetch_thread_ends_when_the_consumer_stops_early():
  before = threading.active_count()
  for y in pipeline.prefetch(itertools.count(), size=2):   # endless source
    if y == 3:
      break
  assert _wait_for_threads(before) == before
  it = pipeline.prefetch(itertools.count(), size=1, transform=str)
  assert next(it) == "0"
  it.close()
  assert _wait_for_threads(before) == before


def test_shuffle_scores_permutes_each_lists_valid_scores_only():
  rng = np.random.default_rng(0)
  arrays = _split(6, list_size=5)
  arrays["scores"] = rng.random((6, 5)).astype(np.float32)
  arrays["mask"][0, 3:] = False
  arrays["scores"][0, 3:] = 0.0
  out = pipeline.shuffle_scores(arrays, seed=1)
  assert not np.array_equal(out["scores"], arrays["scores"])
  for i in range(6):
    m = arrays["mask"][i]
    np.testing.assert_array_equal(np.sort(out["scores"][i][m]),
                                  np.sort(arrays["scores"][i][m]))
    assert np.all(out["scores"][i][~m] == 0)
  for k in arrays:
    if k != "scores":
      np.testing.assert_array_equal(out[k], arrays[k])
  np.testing.assert_array_equal(pipeline.shuffle_scores(arrays, seed=1)["scores"],
                                out["scores"])             # a fixed shuffle per seed
