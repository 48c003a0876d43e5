"""String ids (Amazon's reviewer ids and ASINs) as dense int32 codes, in bounded memory.

The stream stages (``stream``) count and mask rows by raw id, which must be small
integers; Amazon's ids are strings (``reviewerID`` "A2SUAM1J3GNN3B", ``asin``
"0000013714", whose leading zeros only a string keeps). The raw builder codes them
1.. in order of first appearance as it reads the file (``raw.Table.ids``).

The vocabulary is too large for the data set's metadata (JSON, loaded by every
builder) and for a Python dict (about 100 bytes an entry): the Books ratings-only
file holds 51M ratings by millions of reviewers. It is held as arrow string arrays
(the ids' bytes and offsets, about 20 bytes an id), looked up with
``pyarrow.compute.index_in`` chunk by chunk, and written as it grows to a text file
in the prepared data set's folder, one id a line: line ``k`` holds the id of code
``k`` (``read_ids``).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dnr_jax.errors import DataError

_CONSOLIDATE = 64   # merge the vocabulary's arrays when there are more than this


def file_name(table: str, column: str) -> str:
  """The vocabulary file of ``table``'s id column ``column``, in the data set's folder."""
  return f"{table}-{column}.ids.txt"


class IdVocabulary:
  """Codes 1.. for the string ids of one column, the vocabulary written to ``path``."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self._arrays: list[pa.Array] = []
    self._size = 0
    self._file = open(path, "wb")

  def __len__(self) -> int:
    return self._size

  def __enter__(self) -> "IdVocabulary":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._file.close()

  def encode(self, values) -> np.ndarray:
    """int32 codes of ``values`` (strings: numpy objects or arrow); new ids get the
    next codes, in order of first appearance."""
    ids = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
    codes = np.full(len(ids), -1, np.int64)     # 0-based positions; -1: not seen
    if self._arrays:
      known = pc.index_in(ids, value_set=pa.chunked_array(self._arrays, pa.string()))
      codes = np.asarray(known.fill_null(-1), np.int64)
    unseen = codes < 0
    if unseen.any():
      rest = ids.filter(pa.array(unseen))
      new = pc.unique(rest)                     # first-appearance order
      codes[unseen] = np.asarray(pc.index_in(rest, value_set=new)) + self._size
      self._add(new)
    return (codes + 1).astype(np.int32)

  def _add(self, new: pa.Array) -> None:
    if pc.any(pc.match_substring(new, "\n")).as_py():
      bad = new.filter(pc.match_substring(new, "\n"))[0].as_py()
      raise DataError(f"{self.what}: the id {bad!r} holds a line break")
    self._file.write(("\n".join(new.to_pylist()) + "\n").encode("utf8"))
    self._arrays.append(new)
    self._size += len(new)
    if len(self._arrays) > _CONSOLIDATE:
      self._arrays = [pa.concat_arrays(self._arrays)]


def read_ids(folder: str, table: str, column: str) -> np.ndarray:
  """The raw string id of each code (entry 0, the padding code, is ``""``)."""
  path = os.path.join(folder, file_name(table, column))
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such id vocabulary (was the data set prepared with "
                    "string ids?)")
  with open(path, encoding="utf8") as f:
    return np.array([""] + f.read().split("\n")[:-1], dtype=object)
