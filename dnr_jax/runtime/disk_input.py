"""Training batches read from disk with Grain (``TrainConfig``-independent; the
``--input=disk`` of the binaries).

The in-memory pipeline (``pipeline.batches``) permutes a split held in host memory.
For a split too large for that, the lists stay in a list-records file
(``data.list_records``) and each batch is read by random access:

* **the same batches**: the epoch's order is the in-memory pipeline's, drawn from
  ``(seed, epoch)`` by the same generator, and each process takes the same share of
  every global batch, so a run gives the same batches from memory or from disk. The
  order is the one thing held in memory: 4 bytes per training list (``int32``);
* **Grain** reads the batches ahead: a ``MapDataset`` over the epoch's steps, each
  element one batch read from the file (a ``pread`` per list) and decoded in one
  pass, turned into an iterator with ``num_threads`` worker threads and ``prefetch``
  batches of buffer;
* **resumable**: the order is a function of ``(seed, epoch)``, so an iterator's
  whole state is its position ``(epoch, step)``; a run stopped mid-epoch records it
  in its checkpoint (``step_in_epoch``, as for the in-memory input) and starts the
  iterator at the next step, reading none of the skipped lists.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from dnr_jax.data import list_records


def epoch_order(num_lists: int, batch_size: int, *, seed: int, epoch: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This process's list indices of the epoch's full batches, ``[steps, local]``.

  Exactly the lists ``pipeline.batches(..., shuffle=True, pad_last=False)`` yields.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the "
                     f"{process_count} processes")
  order = np.random.default_rng([seed, epoch]).permutation(num_lists).astype(np.int32)
  steps, local = num_lists // batch_size, batch_size // process_count
  order = order[:steps * batch_size].reshape(steps, process_count, local)
  return np.ascontiguousarray(order[:, process_index])


def batches(records: list_records.ListRecords, batch_size: int, *, seed: int,
            epoch: int, process_index: int = 0, process_count: int = 1,
            start_step: int = 0, num_threads: int = 4,
            prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of each full global batch of one epoch, from step
  ``start_step`` on, read ahead by ``num_threads`` Grain threads."""
  import grain  # pylint: disable=g-import-not-at-top
  order = epoch_order(len(records), batch_size, seed=seed, epoch=epoch,
                      process_index=process_index, process_count=process_count)
  if not start_step < len(order):
    return
  steps = grain.MapDataset.range(start_step, len(order))
  dataset = steps.map(lambda step: records.read(order[step]))
  it = iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch)))
  try:
    yield from it
  finally:
    # Stops the reader threads when the epoch is left early (a stop request, an
    # error): threads still reading at interpreter exit abort the process.
    it.close()
