"""The shared machinery of the raw-data TFDS builders (``kuairand``, ``movielens``,
``amazon_books``).

A raw data set is a few *tables* (an interaction log, user features, item features),
each read from one or more delimited or JSON-lines files. The builder turns every
table into a TFDS split of ``array_record`` files whose records are *blocks* of up to
``RECORD_ROWS`` rows stored column-wise (one 1-D array per column): per-row records
would make a 322M-row log take hours to encode, blocks take minutes, and TFDS reads
them back without TensorFlow (``as_data_source``).

What the builder guarantees:

* the source files are found in ``source_dir`` (extracted, or as the official archive,
  whose md5 is checked, ``archives``; a ``.gz`` file also decompressed), or downloaded
  when ``download=True``; missing files raise one error naming each file and where
  to put it;
* every file is streamed in bounded memory and validated (``csv_reader``,
  ``json_reader``): bad columns, unparsable rows, missing, NaN or out-of-range values
  raise ``DataError`` naming the file, line, column and problem;
* categorical string columns become int32 codes (1.., 0 = padding) whose vocabularies
  go to the data set's metadata; string id columns too, their vocabularies (millions
  of ids) to files beside the data set (``id_vocab``, ``read_ids``);
* TFDS writes into an ``incomplete.*`` directory renamed only at the end, so an
  interrupted preparation never looks complete; the next run starts again and
  deletes what the killed one left (``integrity.preparing``);
* the sizes and modification times of the source files are recorded; when one
  changes, the next run prepares the data set again (``integrity``);
* an empty file, or a CSV file whose last line has no line end (a cut-off copy whose
  last line may still parse, e.g. ``60::14::2::9`` for ``60::14::2::978300760``; a JSON
  object ends itself), is a ``DataError`` naming the file;
* generated samples and fixtures carry a marker file (``NOT_REAL_DATA``); the builder
  records ``is_real=False`` and every log line about them says so.
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import shutil
import time
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from dnr_jax.data import archives
from dnr_jax.data import csv_reader
from dnr_jax.data import id_vocab
from dnr_jax.data import integrity
from dnr_jax.data import json_reader
from dnr_jax.errors import DataError
from dnr_jax.data.csv_reader import Column, FileSpec

RECORD_ROWS = 1 << 16
NOT_REAL_MARKER = "NOT_REAL_DATA"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "dnr_jax", "datasets")


def default_data_dir() -> str:
  """``$DNR_DATA_DIR`` or ``~/.cache/dnr_jax/datasets``.

  Not TFDS's ``~/tensorflow_datasets``: TFDS ships an unrelated ``movielens`` data set
  whose cache would share its directory name.
  """
  return os.path.expanduser(os.environ.get("DNR_DATA_DIR", DEFAULT_DATA_DIR))


@dataclasses.dataclass(frozen=True)
class Table:
  """One table of a raw data set, read from ``files`` in order into split ``name``."""
  name: str
  files: tuple[str, ...]
  columns: tuple[Column, ...]
  categorical: tuple[str, ...] = ()   # str columns stored as int32 codes + vocabulary
  # String id columns stored as int32 codes 1..; their (large) vocabularies go to
  # files beside the data set, not to its metadata (``id_vocab``, ``read_ids``).
  ids: tuple[str, ...] = ()
  spec: FileSpec = FileSpec()


@dataclasses.dataclass
class RawConfig(tfds.core.BuilderConfig):
  """A variant of a raw data set: its tables and where its files come from."""
  tables: tuple[Table, ...] = ()
  archive: str | None = None          # the official archive's file name
  url: str | None = None              # where ``download=True`` fetches it
  md5: str | None = None              # the archive's published md5
  homepage: str = ""
  is_sample: bool = False             # a generated sample (never downloaded)


def find_files(root: str, names: Sequence[str]) -> dict[str, str]:
  """Paths of the files called ``names`` anywhere under ``root``; a ``.gz`` name is
  also found decompressed (``Books_5.json`` for ``Books_5.json.gz``)."""
  found = {}
  if root and os.path.isdir(root):
    for dirpath, _, files in os.walk(root):
      for name in names:
        for alias in (name, name[:-3]) if name.endswith(".gz") else (name,):
          if alias in files and name not in found:
            found[name] = os.path.join(dirpath, alias)
  return found


def _codes(values: np.ndarray, vocab: dict[str, int]) -> np.ndarray:
  """int32 codes of string values; new values extend ``vocab`` (codes from 1)."""
  uniq, inverse = np.unique(values.astype(str), return_inverse=True)
  lookup = np.empty(len(uniq), np.int32)
  for j, v in enumerate(uniq):
    lookup[j] = vocab.setdefault(str(v), len(vocab) + 1)
  return lookup[inverse.reshape(-1)]


def _column_dtype(table: Table, name: str) -> np.dtype:
  if name in table.categorical or name in table.ids:
    return np.dtype(np.int32)
  col = next(c for c in table.columns if c.name == name)
  return np.dtype(col.dtype)


def stored_columns(table: Table) -> list[str]:
  return [c.name for c in table.columns] + list(table.categorical) + list(table.ids)


class _VariantFolderFilter(pylogging.Filter):
  """Drops TFDS's "Variant folder ... has no dataset_info.json" warning.

  Preparation holds a lock file in the data set's folder before TFDS has written
  the folder's ``dataset_info.json``, so TFDS warns of a broken data set at every
  builder it constructs while nothing is wrong.
  """

  def filter(self, record: pylogging.LogRecord) -> bool:
    return not (record.pathname.endswith(os.path.join("utils", "file_utils.py"))
                and str(record.msg).startswith("Variant folder"))


pylogging.getLogger("absl").addFilter(_VariantFolderFilter())


class Preparation:
  """What our builders say when they prepare, in place of TFDS's print.

  TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout at
  every preparation, although these builders download only with ``--download``
  (and log it then): the log says what is prepared, where.
  """

  def _log_download_bytes(self) -> None:
    logging.info("preparing %s (%s) in %s", self.name, self.builder_config.name,
                 self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("prepared %s in %s", self.name, self.data_dir)


class RawBuilder(Preparation, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class of the raw builders: subclasses set ``BUILDER_CONFIGS``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Column blocks of the raw tables."}

  def __init__(self, *, source_dir: str | None = None, download: bool = False,
               chunk_bytes: int = 64 << 20, **kwargs):
    kwargs.setdefault("data_dir", default_data_dir())
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.source_dir = os.path.expanduser(source_dir) if source_dir else None
    self.download = download
    self.chunk_bytes = chunk_bytes
    self._init_kwargs = dict(kwargs, source_dir=source_dir, download=download,
                             chunk_bytes=chunk_bytes)

  def fresh(self) -> "RawBuilder":
    """A new builder of the same data set (after its prepared copy was deleted)."""
    return type(self)(**self._init_kwargs)

  def source_files(self) -> dict[str, str]:
    """The source files in ``source_dir`` now: the needed files found there, and the
    official archive when some are not (what ``source_fingerprint`` covers)."""
    cfg = self.builder_config
    names = sorted({f for t in cfg.tables for f in t.files})
    found = find_files(self.source_dir, names)
    if len(found) < len(names) and cfg.archive:
      found.update(find_files(self.source_dir, [cfg.archive]))
    return found

  def source_fingerprint(self) -> dict[str, list[int]]:
    return integrity.fingerprint(self.source_files())

  # -- TFDS -----------------------------------------------------------------------------
  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    features = {
        t.name: tfds.features.FeaturesDict({
            c: tfds.features.Tensor(shape=(None,), dtype=_column_dtype(t, c))
            for c in stored_columns(t)})
        for t in cfg.tables}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,   # keep file order: the log's time order is the truth
        homepage=cfg.homepage)

  def _locate(self, dl_manager) -> tuple[dict[str, str], bool]:
    """Paths of every needed file, and whether they are the real data."""
    cfg = self.builder_config
    names = sorted({f for t in cfg.tables for f in t.files})
    found = find_files(self.source_dir, names)
    if len(found) < len(names) and cfg.archive:
      archive = find_files(self.source_dir, [cfg.archive]).get(cfg.archive)
      if archive is None and self.download and cfg.url:
        logging.info("downloading %s from %s", cfg.archive, cfg.url)
        archive = os.fspath(dl_manager.download(cfg.url))
      if archive is not None:
        if cfg.md5:
          archives.verify_md5(archive, cfg.md5)
        into = os.path.join(os.fspath(dl_manager.download_dir), "extracted",
                            cfg.archive)
        found.update(find_files(archives.extract_archive(archive, into, cfg.archive),
                                names))
    missing = [n for n in names if n not in found]
    if missing:
      where = self.source_dir or "(no source_dir given)"
      fetch = (f"put the archive {cfg.archive} (from {cfg.homepage}) or its extracted "
               f"files into {where}, or set download=True (--download)"
               if cfg.archive else f"put them (from {cfg.homepage}) into {where}")
      raise DataError(f"{self.name}/{cfg.name}: missing source file(s) "
                      f"{', '.join(missing)}; to fix: {fetch}")
    is_real = not any(
        os.path.exists(os.path.join(os.path.dirname(p), NOT_REAL_MARKER))
        for p in found.values())
    return found, is_real

  def _split_generators(self, dl_manager):
    paths, is_real = self._locate(dl_manager)
    self.info.metadata["is_real"] = is_real
    self.info.metadata["source_files"] = {n: os.path.getsize(p) for n, p in paths.items()}
    self.info.metadata["source_fingerprint"] = self.source_fingerprint()
    if not is_real:
      logging.warning("%s/%s: preparing a GENERATED sample (%s marker found), NOT the "
                      "real data", self.name, self.builder_config.name, NOT_REAL_MARKER)
    return {t.name: self._generate_examples(t, paths)
            for t in self.builder_config.tables}

  def _generate_examples(self, table: Table, paths: dict[str, str]
                         ) -> Iterator[tuple[str, Any]]:
    cfg = self.builder_config
    vocabs = {c: {} for c in table.categorical}
    empty = {t.name: {c: np.zeros((0,), _column_dtype(t, c)) for c in stored_columns(t)}
             for t in cfg.tables if t.name != table.name}
    total_bytes = sum(os.path.getsize(paths[f]) for f in table.files)
    done_before, rows, t0, last_log = 0, 0, time.time(), 0.0
    wanted = [c for c in table.columns if c.name not in table.categorical] + [
        Column(c, kind="str", dtype="object", nullable=True) for c in table.categorical
    ] + [Column(c, kind="str", dtype="object") for c in table.ids]
    # Looked up at each call (not bound at import): tests replace the readers.
    reader = (json_reader.iter_chunks if table.spec.format == "jsonl"
              else csv_reader.iter_chunks)
    ids = {c: id_vocab.IdVocabulary(os.path.join(self.data_dir, id_vocab.file_name(
        table.name, c)), f"{self.name}/{cfg.name} {table.name}.{c}") for c in table.ids}
    for fi, name in enumerate(table.files):
      rows_before = rows
      for ci, (chunk, done, _) in enumerate(reader(paths[name], wanted, table.spec,
                                                   self.chunk_bytes)):
        for c in table.categorical:
          chunk[c] = _codes(chunk[c], vocabs[c])
        for c in table.ids:
          chunk[c] = ids[c].encode(chunk[c])
        n = len(next(iter(chunk.values())))
        for start in range(0, n, RECORD_ROWS):
          block = {c: np.ascontiguousarray(chunk[c][start:start + RECORD_ROWS])
                   for c in stored_columns(table)}
          yield f"{fi:03d}-{ci:06d}-{start:09d}", {table.name: block, **empty}
        rows += n
        now = time.time()
        if now - last_log > 5 or done == os.path.getsize(paths[name]):
          last_log = now
          frac = (done_before + done) / max(total_bytes, 1)
          speed = rows / max(now - t0, 1e-9)
          eta = (now - t0) * (1 - frac) / max(frac, 1e-9)
          logging.info("%s/%s %s: %s %5.1f%% of %.1f MB, %d rows, %.0f rows/s, ETA %.0fs",
                       self.name, cfg.name, table.name, name, 100 * frac,
                       total_bytes / 1e6, rows, speed, eta)
      if rows == rows_before:   # TFDS would fail on the empty split, naming no file
        raise DataError(f"{paths[name]}: no data rows: the file is empty"
                        + (" but for its header" if table.spec.header else ""))
      done_before += os.path.getsize(paths[name])
    for vocab in ids.values():
      vocab.close()
    self.info.metadata[f"{table.name}_rows"] = rows
    if ids:
      self.info.metadata[f"{table.name}_ids"] = {c: len(v) for c, v in ids.items()}
    self.info.metadata[f"{table.name}_vocab"] = {
        c: [v for v, _ in sorted(vocabs[c].items(), key=lambda kv: kv[1])]
        for c in table.categorical}


def read_ids(builder: RawBuilder, table: str, column: str) -> np.ndarray:
  """The string id of each code of ``table``'s id column ``column`` (0: ``""``)."""
  return id_vocab.read_ids(builder.data_dir, table, column)


def dense_ids(raw_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dense ids 1..K for raw ids (sorted), and the raw id of each dense id (0: pad)."""
  uniq, inverse = np.unique(raw_ids, return_inverse=True)
  return (inverse.reshape(-1) + 1).astype(np.int32), np.concatenate([[-1], uniq])


def feature_table(table: dict[str, np.ndarray], id_col: str, raw_ids: np.ndarray,
                   features: tuple[str, ...]) -> np.ndarray:
  """``[len(raw_ids), F]`` codes of ``features`` for each raw id (0: unknown)."""
  out = np.zeros((len(raw_ids), len(features)), np.int32)
  if len(table[id_col]):
    order = np.argsort(table[id_col], kind="stable")
    ids = table[id_col][order]
    pos = np.clip(np.searchsorted(ids, raw_ids), 0, len(ids) - 1)
    hit = ids[pos] == raw_ids
    for j, f in enumerate(features):
      out[hit, j] = table[f][order][pos[hit]]
  return out


def prepare(builder: RawBuilder) -> RawBuilder:
  """Prepares ``builder`` once; a complete earlier preparation is reused unless a
  source file changed since (``integrity``: then it is prepared again).

  Returns the prepared builder (a new one when the data set was prepared again).
  """
  what = f"{builder.name}/{builder.builder_config.name}"
  folder = os.path.dirname(builder.data_dir)
  # The common case, a prepared and unchanged data set, under the shared lock: a
  # process building lists from it (``prepare.build``, hours for KuaiRand-27K) holds
  # that lock, and other readers must not wait for it.
  with integrity.reading(folder, what):
    ready = builder.is_prepared() and not integrity.changes(
        builder.info.metadata.get("source_fingerprint"), builder.source_fingerprint())
  if ready:
    return _announce(builder)
  with integrity.preparing(folder, what):
    if builder.is_prepared():
      changed = integrity.changes(builder.info.metadata.get("source_fingerprint"),
                                  builder.source_fingerprint())
      if changed:
        logging.warning("%s: the source files changed since it was prepared (%s); "
                        "preparing it again", what, "; ".join(changed))
        shutil.rmtree(builder.data_dir)
        builder = builder.fresh()
    download_and_prepare(builder, tfds.download.DownloadConfig(try_download_gcs=False))
  return _announce(builder)


def download_and_prepare(builder: tfds.core.DatasetBuilder,
                         download_config: tfds.download.DownloadConfig) -> None:
  """``builder.download_and_prepare``, with TensorFlow's absence named in one line.

  TFDS's writer keeps a split's first 1 GB of serialized examples in memory and
  spills the rest through TensorFlow's file API (``tf.io.gfile``), which dnr-jax
  does not otherwise need: a larger split (millions of lists) needs the ``large``
  extra.

  Raises:
    DataError: the split needed TensorFlow and it is not installed.
  """
  try:
    builder.download_and_prepare(download_config=download_config)
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] != "tensorflow":
      raise
    raise DataError(
        f"{builder.data_dir}: a split of more than 1 GB (TFDS spills it through "
        "TensorFlow's file API) needs TensorFlow: pip install -e '.[large]' (or "
        "tensorflow-cpu), then run again") from e


def _announce(builder: RawBuilder) -> RawBuilder:
  if not builder.info.metadata.get("is_real", True):
    logging.warning("%s/%s at %s is a GENERATED sample, NOT the real data",
                    builder.name, builder.builder_config.name, builder.data_dir)
  return builder


def read_table(builder: RawBuilder, table: str, columns: Sequence[str] | None = None,
               where: tuple[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """The split ``table`` (or just ``columns`` of it) as numpy arrays.

  ``where=(column, values)`` keeps only the rows whose ``column`` is in ``values``
  (filtered block by block, so a large table never sits in memory whole).
  """
  source = builder.as_data_source(split=table)
  parts: dict[str, list[np.ndarray]] = {}
  for i in range(len(source)):
    block = source[i][table]
    keep = np.isin(block[where[0]], where[1]) if where is not None else slice(None)
    for c in columns or block.keys():
      parts.setdefault(c, []).append(np.asarray(block[c])[keep])
  if not parts:
    spec = next(t for t in builder.builder_config.tables if t.name == table)
    return {c: np.zeros((0,), _column_dtype(spec, c))
            for c in columns or stored_columns(spec)}
  return {c: np.concatenate(v) for c, v in parts.items()}
