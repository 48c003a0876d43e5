"""Streaming, validating reader of JSON-lines files (one object a line), gzipped or not.

The Amazon review data's 5-core files (``Books_5.json.gz``: 27M reviews of Books) are
one review a line, each a JSON object of a dozen fields, most of them text the
preparation never reads. They are read like the CSV files (``csv_reader``): in chunks
of ``chunk_bytes`` of decompressed text split at line ends, each parsed by pyarrow
against an explicit schema of the wanted fields only (the other fields, the review
text and the ``style`` dictionaries whose keys vary, are skipped), so memory stays
bounded by the chunk whatever the file's size. A gzipped file (found by its magic
bytes, whatever its name) is decompressed as a stream.

Every chunk is checked like a CSV chunk (``csv_reader.check_values``): missing, empty,
NaN or out-of-range values raise ``DataError`` naming the file, the line (1-based) and
the field. pyarrow's JSON errors name no line of the file, so when pyarrow rejects a
chunk it is re-read line by line with ``json`` (slow, only on the error path) to find
the first bad line and say what is wrong with it: not JSON, not an object, a wanted
field missing or of the wrong type.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import zlib
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from dnr_jax.data import csv_reader
from dnr_jax.data.csv_reader import Column, FileSpec
from dnr_jax.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_JSON_TYPES = {"int": "an integer", "float": "a number", "str": "a string"}


def is_gzip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == _GZIP_MAGIC


def _type_error(value, kind: str) -> bool:
  """Whether a parsed JSON ``value`` cannot be a ``kind`` column's value."""
  if isinstance(value, bool):   # JSON true / false: never a number here
    return True
  if kind == "str":
    return not isinstance(value, str)
  if kind == "int":
    return not isinstance(value, int)
  # Python's json takes NaN and Infinity, which JSON (and pyarrow) does not.
  return not isinstance(value, (int, float)) or not math.isfinite(value)


def _scan_for_error(path: str, data: bytes, first_line: int,
                    columns: Sequence[Column], cause: Exception) -> DataError:
  """Finds the first line of ``data`` that pyarrow could not parse or convert."""
  for offset, raw_line in enumerate(data.split(b"\n")):
    line = first_line + offset
    if not raw_line.strip():
      continue
    try:
      record = json.loads(raw_line)
    except ValueError as e:   # also UnicodeDecodeError
      return DataError(f"{path}: line {line}: not a JSON object ({e}): "
                       f"{raw_line[:200]!r}")
    if not isinstance(record, dict):
      return DataError(f"{path}: line {line}: expected a JSON object, got "
                       f"{type(record).__name__}: {raw_line[:200]!r}")
    for col in columns:
      value = record.get(col.name)
      if value is None:
        if col.nullable:
          continue
        return DataError(f"{path}: line {line}, field {col.name!r}: missing")
      if _type_error(value, col.kind):
        return DataError(f"{path}: line {line}, field {col.name!r}: expected "
                         f"{_JSON_TYPES[col.kind]}, got {json.dumps(value)[:80]}")
  return DataError(f"{path}: lines {first_line}+: unreadable ({cause})")


def _row_lines(data: bytes, first_line: int, rows: int) -> np.ndarray | None:
  """The line of each parsed row when ``data`` has blank lines (pyarrow skips them)."""
  lines = data.split(b"\n")
  if data.endswith(b"\n"):
    lines.pop()
  if rows == len(lines):
    return None
  return first_line + np.flatnonzero([bool(l.strip()) for l in lines])


def iter_chunks(path: str, columns: Sequence[Column], spec: FileSpec = FileSpec(),
                chunk_bytes: int = 64 << 20
                ) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
  """Yields ``(columns, bytes_read, total_bytes)`` chunk by chunk, as
  ``csv_reader.iter_chunks`` does.

  ``columns`` name the wanted fields of each object (other fields are ignored);
  ``bytes_read`` counts the file's bytes (compressed ones for a gzipped file).
  ``spec`` is accepted for the readers' common signature; only its encoding (UTF-8,
  JSON's) matters.

  Raises:
    DataError: the file is missing, is a corrupt or cut-off gzip stream, or a line is
      not a JSON object, lacks a wanted field, or has a value of the wrong type, or a
      missing, empty, NaN or out-of-range one (message: file, line, field, problem).
  """
  del spec
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  total = os.path.getsize(path)
  schema = pa.schema([pa.field(c.name, csv_reader.ARROW_TYPES[c.kind])
                      for c in columns])
  parse_opts = pa_json.ParseOptions(explicit_schema=schema,
                                    unexpected_field_behavior="ignore")
  line = 1
  with open(path, "rb") as raw:
    text = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip(path) else raw
    rest = b""
    while True:
      try:
        block = text.read(chunk_bytes)
      except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: the gzip stream is corrupt or cut off after line "
                        f"{line} ({e}); fetch the file again") from e
      data = rest + block
      if block:
        cut = data.rfind(b"\n") + 1
        if cut == 0:          # a line longer than the chunk: read on
          rest = data
          continue
        data, rest = data[:cut], data[cut:]
      if data.strip():
        # JSON objects end themselves: a last line without a line end is complete
        # when it parses (a cut-off object does not).
        read_opts = pa_json.ReadOptions(block_size=len(data) + 1, use_threads=False)
        try:
          table = pa_json.read_json(io.BytesIO(data), read_options=read_opts,
                                    parse_options=parse_opts)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
          error = _scan_for_error(path, data, line, columns, e)
          if not block and not data.endswith(b"\n"):
            error = DataError(f"{error} (the last line has no line end: the file "
                              "looks cut off)")
          raise error from e
        rows = _row_lines(data, line, table.num_rows)
        yield (csv_reader.check_values(path, table, line, columns, row_lines=rows,
                                       what="field"), raw.tell(), total)
      line += data.count(b"\n")
      if not block:
        break
