"""Reading a lists or interactions file: Parquet or CSV in chunks, and typed columns.

The column readers turn one chunk's column into numpy arrays and raise ``DataError``
naming the file, the row and the column of the first bad value.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from dnr_jax.data.own_lists.format import is_parquet
from dnr_jax.errors import DataError


def header(path: str) -> list[str]:
  """The column names of a lists or interactions file."""
  if is_parquet(path):
    try:
      return list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as e:
      raise DataError(f"{path}: not a readable Parquet file ({e})") from e
  try:
    reader = pa_csv.open_csv(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"{path}: line 1: not a readable CSV file ({e})") from e
  return list(reader.schema.names)


def row_count(path: str) -> int | None:
  """The data rows of a Parquet file (from its footer); ``None`` for CSV, whose rows
  are only known once it is read."""
  if not is_parquet(path):
    return None
  try:
    return pq.ParquetFile(path).metadata.num_rows
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({e})") from e


class Source:
  """A lists or interactions file, read in batches of ``chunk_rows`` rows."""

  def __init__(self, path: str, columns: Sequence[str], chunk_rows: int):
    self.path = path
    self.parquet = is_parquet(path)
    self.names = header(path)
    self.columns = [c for c in self.names if c in set(columns)]
    self.chunk_rows = chunk_rows

  def where(self, row: int, column: str | None = None) -> str:
    """``file: line L`` (CSV) or ``file: row R`` (Parquet) of a 0-based data row."""
    place = f"line {row + 2}" if not self.parquet else f"row {row + 1}"
    col = f", column {column!r}" if column else ""
    return f"{self.path}: {place}{col}"

  def batches(self) -> Iterator[pa.Table]:
    if self.parquet:
      f = pq.ParquetFile(self.path)
      for b in f.iter_batches(batch_size=self.chunk_rows, columns=self.columns):
        yield pa.Table.from_batches([b])
      return
    # Every CSV column is read as text and converted here, so that a bad value is
    # reported with its line (pyarrow's own conversion errors do not say where).
    reader = pa_csv.open_csv(
        self.path, read_options=pa_csv.ReadOptions(block_size=1 << 22),
        convert_options=pa_csv.ConvertOptions(
            column_types={c: pa.string() for c in self.names},
            include_columns=self.columns, strings_can_be_null=True,
            null_values=[""], quoted_strings_can_be_null=False))
    pending: list[pa.RecordBatch] = []
    rows = 0
    try:
      for b in reader:
        pending.append(b)
        rows += b.num_rows
        if rows >= self.chunk_rows:
          yield pa.Table.from_batches(pending)
          pending, rows = [], 0
    except pa.ArrowInvalid as e:
      raise DataError(f"{self.path}: unreadable CSV ({e})") from e
    if pending:
      yield pa.Table.from_batches(pending)


def text(col: pa.ChunkedArray | pa.Array) -> pa.Array:
  """Ids as text: ``5`` and ``"5"`` are the same id."""
  arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
  if pa.types.is_dictionary(arr.type):
    arr = arr.dictionary_decode()
  if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
    arr = pc.cast(arr, pa.string())
  return pc.cast(arr, pa.string())


def first_null(arr: pa.Array) -> int | None:
  """The index of the first null of ``arr``, ``None`` when it has none."""
  if arr.null_count == 0:
    return None
  return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def numbers(src: Source, table: pa.Table, column: str, row0: int) -> np.ndarray:
  """A numeric column as float64 (bools as 0/1); missing or unparsable: DataError."""
  arr = table.column(column).combine_chunks()
  bad = first_null(arr)
  if bad is not None:
    raise DataError(f"{src.where(row0 + bad, column)}: missing value")
  if pa.types.is_boolean(arr.type):
    return arr.to_numpy(zero_copy_only=False).astype(np.float64)
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    try:
      return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      for i, v in enumerate(arr.to_pylist()):
        try:
          float(v)
        except ValueError:
          raise DataError(f"{src.where(row0 + i, column)}: cannot parse {v!r} as a "
                          "number") from None
      raise
  if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or \
      pa.types.is_decimal(arr.type):
    return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
  raise DataError(f"{src.where(row0, column)}: type {arr.type} is not a number")


def times(src: Source, table: pa.Table, row0: int) -> np.ndarray:
  """``time`` as float64: numbers as they are, timestamps / dates in seconds."""
  arr = table.column("time").combine_chunks()
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    try:
      return numbers(src, table, "time", row0)
    except DataError:
      try:   # ISO 8601 text, e.g. 2024-05-01 12:00:00
        arr = pc.cast(arr, pa.timestamp("us"))
      except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{src.where(row0, 'time')}: not a number or an ISO 8601 "
                        "timestamp") from None
  if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
    bad = first_null(arr)
    if bad is not None:
      raise DataError(f"{src.where(row0 + bad, 'time')}: missing value")
    us = pc.cast(pc.cast(arr, pa.timestamp("us")), pa.int64())
    return us.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6
  return numbers(src, table, "time", row0)


def labels(src: Source, table: pa.Table, row0: int) -> np.ndarray:
  """``label`` as float64 0 / 1 (bools, ints or 0.0 / 1.0); anything else: DataError."""
  label = numbers(src, table, "label", row0)
  bad = np.flatnonzero((label != 0) & (label != 1))
  if len(bad):
    raise DataError(f"{src.where(row0 + int(bad[0]), 'label')}: value "
                    f"{label[bad[0]]:g} is not 0 or 1")
  return label


def history_values(arr: pa.Array, separator: str) -> pa.Array:
  """A ``history`` column as list<string> (CSV: ids joined by ``separator``)."""
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    arr = pc.split_pattern(arr, separator)
  if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
    raise ValueError(f"type {arr.type} is not a list")
  return pc.cast(arr, pa.list_(pa.string()))
