"""Streaming, validating reader of the raw data sets' delimited text files.

The raw files are large (KuaiRand-27K: 23 GB of logs), so they are read in chunks of
``chunk_bytes`` split at line ends and parsed by pyarrow; memory stays bounded by the
chunk size whatever the file size. Every chunk is checked against the file's schema:
required columns, types, missing values, NaN and value ranges. A problem raises
``DataError`` naming the file, the line (1-based, as an editor shows it), the column
and what is wrong; nothing half-read is returned.

pyarrow's own messages do not carry line numbers, so when pyarrow rejects a chunk the
chunk is re-scanned line by line (slow, but only on the error path) to find the first
bad line. The value checks (``check_values``) serve the JSON-lines reader too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from dnr_jax.errors import DataError

# The arrow type each ``Column.kind`` is parsed as (by ``json_reader`` too).
ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
# Multi-character delimiters (MovieLens-1M's "::") are rewritten to this byte, which
# does not occur in text files.
_UNIT_SEPARATOR = "\x1f"


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of a raw file: its type, range and whether it may be empty."""
  name: str
  kind: str = "int"             # int | float | str
  dtype: str = "int64"          # the numpy dtype it is stored as
  min: float | None = None
  max: float | None = None
  nullable: bool = False        # empty fields allowed (kept as "" / NaN / -1)


@dataclasses.dataclass(frozen=True)
class FileSpec:
  """How a raw file is laid out."""
  format: str = "csv"           # csv, or jsonl: one JSON object a line (json_reader)
  delimiter: str = ","
  header: bool = True           # False: ``names`` gives the columns in file order
  names: tuple[str, ...] = ()
  encoding: str = "utf8"
  quoting: bool = True


def _decode(raw: bytes, spec: FileSpec) -> bytes:
  if len(spec.delimiter) > 1:
    raw = raw.replace(spec.delimiter.encode(spec.encoding), _UNIT_SEPARATOR.encode())
  return raw


def _delimiter(spec: FileSpec) -> str:
  return _UNIT_SEPARATOR if len(spec.delimiter) > 1 else spec.delimiter


def read_header(path: str, spec: FileSpec) -> list[str]:
  """The file's column names (from its first line, or ``spec.names``)."""
  if not spec.header:
    return list(spec.names)
  with open(path, "rb") as f:
    first = f.readline()
  if not first.strip():
    raise DataError(f"{path}: line 1: the file is empty; expected a header line")
  line = _decode(first, spec).decode(spec.encoding).rstrip("\r\n")
  return next(csv.reader([line], delimiter=_delimiter(spec)))


def check_header(path: str, header: Sequence[str], columns: Sequence[Column]) -> None:
  missing = [c.name for c in columns if c.name not in header]
  if missing:
    raise DataError(f"{path}: line 1: missing column(s) {missing}; the header has "
                    f"{list(header)}. Is this the right file of the right data set?")


def _scan_for_error(path: str, raw: bytes, first_line: int, spec: FileSpec,
                    header: Sequence[str], columns: Sequence[Column],
                    cause: Exception) -> DataError:
  """Finds the first line of ``raw`` that pyarrow could not parse or convert."""
  text = _decode(raw, spec).decode(spec.encoding, errors="replace")
  reader = csv.reader(io.StringIO(text), delimiter=_delimiter(spec),
                      quoting=csv.QUOTE_MINIMAL if spec.quoting else csv.QUOTE_NONE)
  index = {name: i for i, name in enumerate(header)}
  for offset, fields in enumerate(reader):
    line = first_line + offset
    if len(fields) != len(header):
      return DataError(f"{path}: line {line}: expected {len(header)} fields, got "
                       f"{len(fields)}: {spec.delimiter.join(fields)[:200]!r}")
    for col in columns:
      value = fields[index[col.name]]
      if value == "" and col.nullable:
        continue
      try:
        if col.kind == "int":
          int(value)
        elif col.kind == "float":
          float(value)
      except ValueError:
        return DataError(f"{path}: line {line}, column {col.name!r}: cannot parse "
                         f"{value!r} as {col.kind}")
  return DataError(f"{path}: lines {first_line}+: unreadable ({cause})")


def check_values(path: str, table: pa.Table, first_line: int,
                 columns: Sequence[Column], row_lines: np.ndarray | None = None,
                 what: str = "column") -> dict[str, np.ndarray]:
  """The parsed ``table`` as numpy arrays, after checking every value of ``columns``.

  Missing values (and empty strings) where the column is not ``nullable``, NaN, and
  values outside ``[min, max]`` raise ``DataError`` naming the file, the line and the
  ``what`` (``"column"``; the JSON-lines reader says ``"field"``). Row ``r`` is on
  line ``first_line + r``, or ``row_lines[r]`` when given (a chunk with blank lines).
  """
  def where(row: int) -> str:
    line = first_line + row if row_lines is None else int(row_lines[row])
    return f"{path}: line {line}, {what} {col.name!r}"

  out = {}
  for col in columns:
    arr = table.column(col.name)
    if arr.null_count and not col.nullable:
      bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
      raise DataError(f"{where(bad)}: missing value")
    if col.kind == "str":
      values = arr.fill_null("").to_numpy(zero_copy_only=False).astype(object)
      if not col.nullable and (values == "").any():
        raise DataError(f"{where(int(np.flatnonzero(values == '')[0]))}: empty value")
      out[col.name] = values
      continue
    if col.kind == "int":
      values = arr.fill_null(-1).to_numpy()
    else:
      values = arr.to_numpy(zero_copy_only=False).astype(np.float64)
      nan = np.isnan(values)
      if nan.any() and not col.nullable:
        raise DataError(f"{where(int(np.flatnonzero(nan)[0]))}: NaN")
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    if col.kind == "float":
      present &= ~np.isnan(values)
    lo = -math.inf if col.min is None else col.min
    hi = math.inf if col.max is None else col.max
    wrong = present & ((values < lo) | (values > hi))
    if wrong.any():
      bad = int(np.flatnonzero(wrong)[0])
      raise DataError(f"{where(bad)}: value {values[bad]} out of range [{col.min}, "
                      f"{col.max}]")
    out[col.name] = values.astype(col.dtype)
  return out


def iter_chunks(path: str, columns: Sequence[Column], spec: FileSpec = FileSpec(),
                chunk_bytes: int = 64 << 20
                ) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
  """Yields ``(columns, bytes_read, total_bytes)`` chunk by chunk.

  ``columns`` maps each requested column name to a numpy array of the chunk's rows
  (``Column.dtype``; strings as object arrays). Extra columns of the file are ignored.

  Raises:
    DataError: the file is missing, lacks a column, or a line is malformed, has a
      missing, NaN or out-of-range value, or is a last line without a line end (a
      cut-off file) (message: file, line, column, problem).
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  header = read_header(path, spec)
  check_header(path, header, columns)
  total = os.path.getsize(path)
  types = {c.name: ARROW_TYPES[c.kind] for c in columns}
  read_opts = pa_csv.ReadOptions(column_names=list(header), encoding=spec.encoding,
                                 block_size=max(chunk_bytes, 1 << 20) + (1 << 20))
  parse_opts = pa_csv.ParseOptions(delimiter=_delimiter(spec), quote_char='"' if
                                   spec.quoting else False)
  convert_opts = pa_csv.ConvertOptions(
      column_types=types, include_columns=[c.name for c in columns],
      # Only an empty field is missing; "nan" / "NA" stay values (a float NaN, an
      # unparsable int) so the error says what the file really holds.
      null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False)
  line = 2 if spec.header else 1
  with open(path, "rb") as f:
    if spec.header:
      f.readline()
    done = f.tell()
    rest = b""
    while True:
      block = f.read(chunk_bytes)
      data = rest + block
      if not block:
        rest = b""
      else:
        cut = data.rfind(b"\n") + 1
        if cut == 0:          # a line longer than the chunk: read on
          rest = data
          continue
        data, rest = data[:cut], data[cut:]
      if not data.strip():
        if not block:
          break
        continue
      if not block and not data.endswith(b"\n"):
        # Every line of a complete file ends with a line end; a last line without
        # one is where a copy or download stopped, and it may still parse (MovieLens
        # "60::14::2::9" for "60::14::2::978300760": a rating from 1970).
        last = data.decode(spec.encoding, errors="replace")
        raise DataError(f"{path}: line {line}: the last line has no line end "
                        f"({last[:80]!r}): the file looks cut off; fetch it again (or, "
                        "if it is complete, end it with a newline)")
      done += len(data)
      try:
        table = pa_csv.read_csv(io.BytesIO(_decode(data, spec)), read_options=read_opts,
                                parse_options=parse_opts, convert_options=convert_opts)
      except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise _scan_for_error(path, data, line, spec, header, columns, e) from e
      yield check_values(path, table, line, columns), done, total
      line += data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
      if not block:
        break
