"""Host-side input pipeline: in-memory list arrays -> per-process batches.

A data set split is a ``ListArrays``: a dict from ``batch.FIELDS`` names to numpy arrays
whose leading axis indexes lists. Prepared lists are small per row (``n`` = 50 ints and
floats), so a split of millions of lists fits in host memory and the pipeline is a
permutation plus fancy indexing, far cheaper than a train step. ``prefetch`` runs that
work and the host-to-device copy in a background thread, so they overlap with the
device's compute (``benchmarks/input_pipeline.py`` measures both sides).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Mapping, Optional, TypeVar

import numpy as np

from dnr_jax import batch as batch_lib

ListArrays = Mapping[str, np.ndarray]


def num_lists(arrays: ListArrays) -> int:
  return int(arrays["items"].shape[0])


def complete(arrays: ListArrays) -> dict[str, np.ndarray]:
  """Returns ``arrays`` with the optional fields filled in and dtypes normalised."""
  b = batch_lib.ListBatch.from_arrays(arrays)
  out = {}
  for k in batch_lib.FIELDS:
    v = np.asarray(getattr(b, k))
    if k in ("scores", "labels"):
      v = v.astype(np.float32)
    elif k in ("mask", "history_mask"):
      v = v.astype(bool)
    else:
      v = v.astype(np.int32)
    out[k] = v
  n = num_lists(out)
  bad = [k for k, v in out.items() if v.shape[0] != n]
  if bad:
    raise ValueError(f"fields {bad} do not have {n} lists on their leading axis")
  return out


def batches(arrays: ListArrays, batch_size: int, *, shuffle: bool, seed: int = 0,
            epoch: int = 0, process_index: int = 0, process_count: int = 1,
            pad_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's share of each global batch of one epoch.

  Args:
    arrays: a complete split (see ``complete``).
    batch_size: the *global* batch size; each process gets ``batch_size //
      process_count`` lists of every batch (multi-host: every process runs the same
      loop and feeds its local devices).
    shuffle: permute the lists, by ``(seed, epoch)`` so every process and every resumed
      run draws the same order.
    pad_last: the last partial batch is filled with all-padding lists (mask False,
      so they count in no loss or metric) instead of being dropped: evaluation sees
      every list and batch shapes never change, so nothing recompiles.

  Yields:
    dicts with the ``batch.FIELDS`` keys and leading size ``batch_size // process_count``.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the "
                     f"{process_count} processes")
  n = num_lists(arrays)
  order = np.arange(n)
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(n)
  local = batch_size // process_count
  stop = n if pad_last else n - n % batch_size
  for start in range(0, stop, batch_size):
    idx = order[start:start + batch_size]
    idx = idx[process_index * local:(process_index + 1) * local]
    out = {k: v[idx] for k, v in arrays.items()}
    short = local - len(idx)
    if short:
      out = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
             for k, v in out.items()}
    yield out


def shuffle_scores(arrays: ListArrays, seed: int = 0) -> dict[str, np.ndarray]:
  """``arrays`` with each list's scores permuted among its valid candidates.

  Everything else (ids, labels, order, padding) is kept, so a reranker evaluated on
  the result loses exactly what the score *values* told it about each candidate.
  """
  scores, mask = arrays["scores"], arrays["mask"]
  keys = np.random.default_rng(seed).random(scores.shape)
  # Sorting random keys with padding last permutes each list's valid prefix only
  # (valid candidates come first, see dnr_jax.batch).
  perm = np.argsort(np.where(mask, keys, np.inf), axis=1)
  out = dict(arrays)
  out["scores"] = np.where(mask, np.take_along_axis(scores, perm, 1), 0.0).astype(
      scores.dtype)
  return out


def steps_per_epoch(arrays: ListArrays, batch_size: int, pad_last: bool) -> int:
  n = num_lists(arrays)
  return -(-n // batch_size) if pad_last else n // batch_size


T = TypeVar("T")
_END = object()  # the worker's last queue entry when the iterator is exhausted


def prefetch(iterator: Iterable[T], size: int = 2,
             transform: Optional[Callable[[T], object]] = None) -> Iterator[object]:
  """Yields ``transform(item)`` for each item, computed ahead in a background thread.

  While the caller works on one item (a train step), one daemon thread draws the next
  items from ``iterator`` (host batch assembly) and transforms them (e.g.
  ``Runner.put_batch``, the host-to-device copy), keeping up to ``size`` of them ready.

  Args:
    iterator: the items, consumed in the worker thread only.
    size: how many transformed items may wait ahead of the consumer; 0 runs
      everything in the caller's thread (a plain ``map``).
    transform: applied to every item in the worker thread (default: identity).

  Yields:
    ``transform(item)`` for each item of ``iterator``, in order.

  Raises:
    Whatever ``iterator`` or ``transform`` raised in the worker: the same exception
    object, so its type is kept and its traceback still holds the worker's frames.
  """
  if size < 0:
    raise ValueError(f"prefetch size={size} must be >= 0")
  transform = transform or (lambda x: x)
  if size == 0:
    yield from map(transform, iterator)
    return
  ready = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(entry) -> bool:
    # Never block for good on a full queue: once the consumer is gone nobody reads
    # it, and the thread must notice ``stop`` and end rather than leak.
    while not stop.is_set():
      try:
        ready.put(entry, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for item in iterator:
        if not put((transform(item), None)):
          return
    except BaseException as e:  # pylint: disable=broad-except
      put((None, e))            # re-raised in the consumer; a silent end would hang it
      return
    finally:
      # A generator source is closed in the thread that runs it, when it ends or
      # the consumer leaves early: the disk input's reader threads stop with it.
      close = getattr(iterator, "close", None)
      if close is not None:
        close()
    put((_END, None))

  worker = threading.Thread(target=work, name="dnr-prefetch", daemon=True)
  worker.start()
  try:
    while True:
      value, error = ready.get()
      if error is not None:
        raise error
      if value is _END:
        return
      yield value
  finally:
    # Runs on exhaustion, on an error, and when the consumer stops early (``break``,
    # ``close()``, garbage collection): the worker then ends after its current item,
    # which it is given a moment to finish (a daemon thread killed at exit in the
    # middle of a read can abort the process).
    stop.set()
    if worker is not threading.current_thread():
      worker.join(timeout=10)
