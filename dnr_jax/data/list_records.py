"""Training lists on disk, fixed-size records read by index.

The prepared data sets store 1,024 lists per array_record record (``prepare.list_records``):
right for loading a split whole, wrong for reading one list, which would decode 1,024.
A split that does not fit in host memory is written once more in this layout
(``write_list_records``): every list is one fixed-size record, the ``batch.FIELDS``
arrays' bytes back to back in a fixed order and shape, so list ``i`` starts at byte
``i * record_bytes``, is read with one ``pread`` and a batch is decoded in one
``np.frombuffer``. The shapes live in a JSON header beside the records
(``<path>.json``).

Why not array_record with one list per record (``group_size:1``, what Grain's
array_record source expects): measured on 10M lists (``docs/performance.md``), its
reader holds an index of 0.9 GB and reads 1,800 random lists/s, twelve times fewer
than on 1M lists; ``pread`` on this layout reads over 500,000 lists/s at 10M with no
index at all (``benchmarks.disk_input`` reads 166,000 lists/s from a 10M-list file
with 4 threads, while the step trains 7,000). The records are not compressed (about
450 bytes a list at n = H = 20).

``ListRecords`` opens such a file. ``read(indices)`` returns the arrays of those
lists in that order; ``runtime.disk_input`` feeds training from it with Grain.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Iterable, Mapping, Sequence

import numpy as np

from dnr_jax import batch as batch_lib
from dnr_jax.errors import DataError

FIELDS = batch_lib.FIELDS
FORMAT = "dnr-jax list records 1"


def _layout(shapes: Mapping[str, Sequence[int]]) -> list[tuple[str, tuple, np.dtype, int]]:
  """``(field, per-list shape, dtype, bytes)`` in record order."""
  out = []
  for f in FIELDS:
    dtype = np.dtype(batch_lib.SCHEMA[f].dtype)
    shape = tuple(int(d) for d in shapes[f])
    out.append((f, shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize))
  return out


def write_list_records(path: str, chunks: Iterable[Mapping[str, np.ndarray]]) -> int:
  """Writes the lists of ``chunks`` (complete ``batch.FIELDS`` arrays, any number of
  lists each, the same per-list shapes) to ``path``, one record per list, atomically:
  under a temporary name of this process's own, renamed when whole (the header
  first), so writers racing for one path each leave a whole file. Returns the number
  of lists."""
  tmp = f"{path}.incomplete-{os.getpid()}-{threading.get_ident()}"
  shapes, count = None, 0
  try:
    with open(tmp, "wb") as f:
      for chunk in chunks:
        got = {k: tuple(np.shape(chunk[k])[1:]) for k in FIELDS}
        if shapes is None:
          shapes = got
        elif got != shapes:
          raise DataError(f"{path}: a chunk's per-list shapes {got} differ from the "
                          f"first chunk's {shapes}")
        n = len(chunk["items"])
        if n == 0:
          continue
        # One contiguous [n, record bytes] block: the chunk's records in order.
        f.write(np.concatenate(
            [np.ascontiguousarray(chunk[k], dtype=batch_lib.SCHEMA[k].dtype)
             .reshape(n, -1).view(np.uint8) for k in FIELDS], axis=1).tobytes())
        count += n
    if shapes is None:
      raise DataError(f"{path}: no lists to write")
    record_bytes = sum(b for *_, b in _layout(shapes))
    with open(tmp + ".json", "w") as f:
      json.dump({"format": FORMAT, "lists": count, "record_bytes": record_bytes,
                 "shapes": {k: list(v) for k, v in shapes.items()}}, f)
  except BaseException:
    for leftover in (tmp, tmp + ".json"):
      if os.path.exists(leftover):
        os.remove(leftover)
    raise
  os.replace(tmp + ".json", path + ".json")
  os.replace(tmp, path)
  return count


class ListRecords:
  """A list-records file (``write_list_records``), read by index.

  Thread-safe for reading: ``runtime.disk_input`` reads batches from several threads.
  ``raw`` reads with ``pread`` into fresh buffers: reading the whole file over an
  epoch leaves the process's resident memory where it was (a memory map would count
  the pages read in it).
  """

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path + ".json") as f:
        header = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"{path}.json: not a list-records header ({e})") from e
    if header.get("format") != FORMAT:
      raise DataError(f"{path}.json: format {header.get('format')!r}, this dnr-jax "
                      f"reads {FORMAT!r}")
    try:
      self.shapes = {k: tuple(header["shapes"][k]) for k in FIELDS}
      self._count = int(header["lists"])
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{path}.json: an incomplete list-records header ({e!r})") from e
    self._layout = _layout(self.shapes)
    self.record_bytes = sum(b for *_, b in self._layout)
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size != self._count * self.record_bytes:
      raise DataError(f"{path}: {size} bytes, the header says {self._count} lists of "
                      f"{self.record_bytes} bytes (a damaged or replaced file)")
    self._fd = os.open(path, os.O_RDONLY)

  def close(self) -> None:
    fd, self._fd = getattr(self, "_fd", None), None
    if fd is not None:
      os.close(fd)

  def __del__(self):
    self.close()

  def __len__(self) -> int:
    return self._count

  def decode(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
    """The arrays of raw records, stacked in their order."""
    raw = np.frombuffer(b"".join(records), np.uint8)
    if raw.size != len(records) * self.record_bytes:
      raise DataError(f"{self.path}: a record is not {self.record_bytes} bytes long "
                      "(a damaged file)")
    raw = raw.reshape(len(records), self.record_bytes)
    out, at = {}, 0
    for f, shape, dtype, nbytes in self._layout:
      out[f] = np.ascontiguousarray(raw[:, at:at + nbytes]).view(dtype).reshape(
          (len(records),) + shape)
      at += nbytes
    return out

  def raw(self, indices: Sequence[int]) -> list[bytes]:
    """The records at ``indices``, undecoded: one ``pread`` each (thread-safe: no
    shared file position)."""
    size = self.record_bytes
    out = []
    for i in indices:
      i = int(i)
      if not 0 <= i < self._count:
        raise IndexError(f"{self.path}: list {i} of {self._count}")
      out.append(os.pread(self._fd, size, i * size))
    return out

  def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The lists at ``indices`` (any order, repeats allowed) as ``FIELDS`` arrays."""
    return self.decode(self.raw(indices))


def comparable(splits: Mapping[str, object]) -> dict:
  """``splits`` with each ``ListRecords`` replaced by a few arrays that identify it:
  its size, its record layout and its first and last lists (what processes compare
  with ``distributed.fingerprint`` without reading a split that is on disk)."""
  out = {}
  for name, split in splits.items():
    if isinstance(split, ListRecords):
      n = len(split)
      out[name] = {"lists": np.array([n, split.record_bytes]),
                   **split.read([0, n - 1] if n else [])}
    else:
      out[name] = split
  return out
