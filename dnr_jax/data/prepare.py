"""From raw files to cached reranking lists: ``DataConfig`` and ``prepare_lists``.

The stages, each a documented config value:

1. the raw TFDS data set (``kuairand`` / ``movielens`` / ``amazon_books``; ``sample``
   = a generated sample in the data set's schema, NOT the real data);
2. the label (KuaiRand ``is_click`` by default, ``long_view`` as an option; MovieLens
   and Amazon-Books rating >= 4) and the paper's k-core filter (20);
3. the time cuts (``lists.TimeSplits``) and the MF retriever, trained on the events
   before the retriever's cut only (its held-out AUC goes into the report);
4. the lists (``lists.protocol``), from the later events only, split by time.

Stages 2-4 stream the log (``dnr_jax.data.stream``): passes over its blocks, then
one user shard of at most about ``shard_rows`` rows in memory at a time, so a log of
any size (KuaiRand-27K: 322M rows) is prepared in bounded memory; the shards' rows
and lists wait on disk, in a temporary directory beside the cache, until written.

The result is cached as a versioned TFDS data set, ``dnr_lists``, whose config name is
a hash of everything that shapes the lists (the data config, ``LISTS_VERSION`` and the
raw data set's version), so a second run with the same config starts at once and any
change gives a new data set. The sizes and modification times of the source files
are recorded with it: when a source file changes, the lists (and the raw data set)
are prepared again (``integrity``). Preparation holds a lock on the data set's
folder, where it spills (``incomplete.spill``) and where the leftovers of killed
preparations are deleted. The preparation report (counts, cuts, retriever AUC,
raw-score AUC per split) is kept in the data set's metadata and logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from dnr_jax import batch as batch_lib
from dnr_jax.batch import FIELDS
from dnr_jax.data import (amazon_books, dual_tower, integrity, kuairand, lists,
                           movielens, raw, samples, types)
from dnr_jax.data import list_records as records_lib
from dnr_jax.data import retriever as retriever_lib
from dnr_jax.data import stream as stream_lib
from dnr_jax.errors import DataError
from dnr_jax.errors import ConfigError

# Bump when list construction changes: cached lists of older code are then rebuilt.
LISTS_VERSION = "2.1.0"   # 2.x: time cuts, streamed preparation; 2.1: 2^16 time bins
DATASETS = {"kuairand": tuple(kuairand.CONFIGS), "movielens": tuple(movielens.CONFIGS),
            "amazon_books": tuple(amazon_books.CONFIGS)}
# Per data set: its raw builder, and the schema and writer of its generated sample
# (the writer looked up at each call, so that tests can replace it).
_BUILDERS = {"kuairand": kuairand.Kuairand, "movielens": movielens.Movielens,
             "amazon_books": amazon_books.AmazonBooks}
_SAMPLES = {
    "kuairand": ("KuaiRand-Pure", lambda d, c: samples.write_kuairand(d, c)),
    "movielens": ("MovieLens-1M", lambda d, c: samples.write_movielens(d, c, "1m")),
    "amazon_books": ("Amazon-Books", lambda d, c: samples.write_amazon_books(d, c)),
}
_LISTS_PER_RECORD = 1024   # lists per array_record entry (``list_records``)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data, and how lists are made from it (see ``default_config``).

  Attributes:
    dataset / variant: ``kuairand`` (``sample``, ``pure``, ``1k``, ``27k``),
      ``movielens`` (``sample``, ``100k``, ``1m``) or ``amazon_books`` (``sample``,
      ``books``, ``books_ratings``); ``sample`` is generated in the real files'
      schema (NOT real data).
    source_dir: where the raw files or the official archive are (default:
      ``<data_dir>/manual/<dataset>-<variant>``; the sample is generated there).
    data_dir: where the TFDS data sets go (default ``raw.default_data_dir()``).
    download: fetch the official archive when ``source_dir`` lacks the files (not
      for Amazon-Books, which publishes no archive or checksum).
    label: KuaiRand's positive signal (``kuairand.LABELS``).
    rating_threshold: MovieLens and Amazon-Books ratings >= this are positive.
    include_random: keep KuaiRand's randomly exposed impressions.
    k_core: the paper's filter (users and items with fewer rows are dropped).
    lists / retriever: list protocol and retriever stage.
    sample: size and truth of the generated sample (``variant="sample"``).
    shard_rows: rows of the log held in memory at once while lists are built (the
      memory bound of preparation; it does not change the lists).
  """
  dataset: str = "kuairand"
  variant: str = "sample"
  source_dir: str | None = None
  data_dir: str | None = None
  download: bool = False
  label: str = "is_click"
  rating_threshold: int = 4
  include_random: bool = False
  k_core: int = 20
  lists: lists.ListConfig = lists.ListConfig()
  retriever: retriever_lib.RetrieverConfig = retriever_lib.RetrieverConfig()
  sample: samples.SampleConfig = samples.SampleConfig()
  shard_rows: int = 8_000_000

  def validate(self) -> None:
    if self.dataset not in DATASETS:
      raise ConfigError(f"data.dataset={self.dataset!r} is not one of {list(DATASETS)}")
    if self.variant not in DATASETS[self.dataset]:
      raise ConfigError(f"data.variant={self.variant!r} is not one of "
                        f"{DATASETS[self.dataset]} for {self.dataset}")
    if self.dataset == "kuairand" and self.label not in kuairand.LABELS:
      raise ConfigError(f"data.label={self.label!r} is not one of {kuairand.LABELS}")
    if self.dataset != "kuairand" and self.label != DataConfig.label:
      raise ConfigError(f"data.label={self.label!r} is KuaiRand's; {self.dataset} labels "
                        "come from data.rating_threshold")
    if self.dataset == "amazon_books" and self.download:
      raise ConfigError("data.download: Amazon-Books has no archive to download; fetch "
                        f"{amazon_books.REVIEWS_FILE} (or {amazon_books.RATINGS_FILE}) "
                        f"from {amazon_books.HOMEPAGE} into data.source_dir")
    if not 1 <= self.rating_threshold <= 5:
      raise ConfigError(f"data.rating_threshold={self.rating_threshold} must be in 1..5")
    if self.k_core < 1:
      raise ConfigError(f"data.k_core={self.k_core} must be >= 1")
    if self.shard_rows < 1:
      raise ConfigError(f"data.shard_rows={self.shard_rows} must be >= 1")
    self.lists.validate()
    self.retriever.validate()

  @property
  def is_sample(self) -> bool:
    return self.variant == "sample"


def default_config(dataset: str = "kuairand", variant: str = "sample",
                   **overrides) -> DataConfig:
  """The recommended config per data set: KuaiRand lists are real impressions
  (``exposure``); MovieLens and Amazon-Books have no impressions, so their lists are
  the retriever's top ``n`` labelled by the next ``window`` positive ratings
  (``retrieval``)."""
  protocol = "exposure" if dataset == "kuairand" else "retrieval"
  base = DataConfig(dataset=dataset, variant=variant,
                    lists=lists.ListConfig(protocol=protocol))
  return dataclasses.replace(base, **overrides)


def data_dir(config: DataConfig) -> str:
  """Where ``config``'s prepared data sets go."""
  return os.path.expanduser(config.data_dir or raw.default_data_dir())


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                        ).hexdigest()[:16]


def cache_key(config: DataConfig) -> str:
  """The hash naming the cached lists: every field that shapes them, and versions."""
  fields = dataclasses.asdict(config)
  for where in ("source_dir", "data_dir", "download", "shard_rows"):
    fields.pop(where)
  if config.retriever.kind == "mf":
    # Fields added with the dual tower: left out for MF, so the lists cached before
    # it existed keep their keys (the dual tower's keys include them).
    for where in ("kind", "tower_history"):
      fields["retriever"].pop(where)
  if not config.is_sample:
    fields.pop("sample")
  return _digest({"config": fields, "lists_version": LISTS_VERSION,
                  "raw_version": str(raw.RawBuilder.VERSION)})


def raw_builder(config: DataConfig) -> raw.RawBuilder:
  """The raw data set's builder (for the sample: generated on first use)."""
  root = data_dir(config)
  source = config.source_dir or os.path.join(
      root, "manual", f"{config.dataset}-{config.variant}")
  builder_dir = root
  if config.is_sample:
    # Each sample size is its own data set, so a changed SampleConfig is never served
    # from an older sample's cache.
    key = _digest(dataclasses.asdict(config.sample))
    source = config.source_dir or os.path.join(
        root, "manual", f"{config.dataset}-sample-{key}")
    builder_dir = os.path.join(root, "samples", key)
    if not raw.find_files(source, [raw.NOT_REAL_MARKER]):
      schema, write = _SAMPLES[config.dataset]
      logging.warning("generating the %s-schema sample in %s (NOT the real data)",
                      schema, source)
      if config.source_dir:
        write(source, config.sample)
      else:
        # Generated beside its place and moved in when complete: the marker file is
        # written first, so a killed generation would otherwise look complete.
        os.makedirs(os.path.dirname(source), exist_ok=True)
        integrity.remove_old(os.path.dirname(source), integrity.INCOMPLETE_PREFIX)
        tmp = tempfile.mkdtemp(prefix=integrity.INCOMPLETE_PREFIX,
                               dir=os.path.dirname(source))
        write(tmp, config.sample)
        shutil.rmtree(source, ignore_errors=True)   # a killed generation's leftovers
        try:
          os.rename(tmp, source)
        except OSError:                    # another run finished it first
          shutil.rmtree(tmp, ignore_errors=True)
  return _BUILDERS[config.dataset](config=config.variant, data_dir=builder_dir,
                                   source_dir=source, download=config.download)


def log_stream(config: DataConfig,
               builder: raw.RawBuilder | None = None) -> stream_lib.LogStream:
  """The cleaned log of ``config`` as a stream of blocks (raw data set prepared if
  needed; ``builder``: already prepared, read as it is)."""
  config.validate()
  builder = builder or raw.prepare(raw_builder(config))
  if config.dataset == "kuairand":
    return kuairand.log_stream(builder, config.label, config.include_random)
  if config.dataset == "amazon_books":
    return amazon_books.log_stream(builder, config.rating_threshold)
  return movielens.log_stream(builder, config.rating_threshold)


def load_interactions(config: DataConfig) -> types.Interactions:
  """The whole cleaned, time-sorted log of ``config`` in memory (before the k-core).

  For analysis of logs that fit in memory; ``prepare_lists`` streams instead.
  """
  return log_stream(config).load()


def _utc(ms: int) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def train_retriever(users: np.ndarray, items: np.ndarray, num_users: int,
                    num_items: int, config: retriever_lib.RetrieverConfig, *,
                    times: np.ndarray | None = None, features: dict | None = None,
                    feature_vocab: tuple = ((), ())):
  """The retriever (``config.kind``) on the positives before the retriever's cut.

  Sorting by (user, item) (the dual tower: by user and time) makes the retriever
  independent of the order the log was read in (file order, shards), so streamed
  and in-memory preparation agree. The dual tower needs the positives' ``times``,
  ``features`` (``user_features`` / ``item_features`` of the whole vocabulary) and
  the feature columns' vocabulary sizes ``(user, item)``.
  """
  logging.info("retriever (%s): %d positives before the cut", config.kind, len(users))
  if config.kind == "dual_tower":
    if times is None or features is None:
      raise ValueError("the dual-tower retriever needs the positives' times and the "
                       "feature tables")
    return dual_tower.train(
        users, items, times, num_users=num_users, num_items=num_items,
        user_features=features["user_features"],
        item_features=features["item_features"], user_feature_vocab=feature_vocab[0],
        item_feature_vocab=feature_vocab[1], config=config)
  order = np.lexsort((items, users))
  params, report = retriever_lib.train(users[order], items[order], num_users=num_users,
                                       num_items=num_items, config=config)
  return params, {"kind": "mf", **report}


@dataclasses.dataclass
class Built:
  """What ``build`` made: list files per split (in ``spill_dir``) and the metadata."""
  files: dict[str, list[str]]
  meta: dict[str, Any]


def build(config: DataConfig, spill_dir: str) -> Built:
  """Runs every stage (no cache), streaming the log; lists go to ``spill_dir``.

  Memory stays O(``config.shard_rows`` + users + items), whatever the log's size.
  The raw data set's shared lock is held throughout: the log is read in several
  passes, and another process that finds its sources changed would otherwise delete
  it in between (``integrity``).
  """
  builder = raw.prepare(raw_builder(config))
  what = f"{builder.name}/{builder.builder_config.name}"
  with integrity.reading(os.path.dirname(builder.data_dir), what):
    # A fresh builder: between the two locks another process may have prepared the
    # data set again (complete, under its exclusive lock) or failed to.
    builder = raw_builder(config)
    if not builder.is_prepared():
      raise DataError(f"{builder.data_dir}: the raw data set was deleted by another "
                      "process while this one was about to read it; run again")
    return _build(config, spill_dir, builder)


def _build(config: DataConfig, spill_dir: str, builder: raw.RawBuilder) -> Built:
  t0 = time.time()
  stream = log_stream(config, builder)
  seconds = {"raw": time.time() - t0}
  vocab = stream_lib.k_core(stream, config.k_core)
  seconds["k_core"] = time.time() - t0 - sum(seconds.values())
  logging.info("after the %d-core: %d rows, %d users, %d items", config.k_core,
               vocab.rows, vocab.num_users - 1, vocab.num_items - 1)
  end = lists.retriever_end(vocab.hist, config.lists)
  logging.info("the retriever's cut: %s (%d rows before it)", _utc(end),
               vocab.hist.rows_before(end))
  shard_of_user = stream_lib.plan_shards(vocab.user_rows, config.shard_rows)
  num_shards = int(shard_of_user.max()) + 1
  pos_users, pos_items, pos_times = stream_lib.partition(stream, vocab, shard_of_user,
                                                         end, spill_dir)
  seconds["partition"] = time.time() - t0 - sum(seconds.values())
  features = {"user_features": stream.user_features(vocab.user_raw_id),
              "item_features": stream.item_features(vocab.item_raw_id)}
  params, retriever_report = train_retriever(
      pos_users, pos_items, vocab.num_users, vocab.num_items, config.retriever,
      times=pos_times, features=features,
      feature_vocab=(stream.user_feature_vocab, stream.item_feature_vocab))
  seconds["retriever"] = time.time() - t0 - sum(seconds.values())
  stats = lists.ListStats()
  shard_files, start_times = [], []
  t_lists = time.time()
  for shard in range(num_shards):
    log = stream_lib.load_shard(spill_dir, shard, vocab, features, stream)
    built, dropped = lists.build_shard(log, params, config.lists, end)
    stats.short_lists_dropped += dropped
    stats.list_rows += int((log.time >= end).sum())
    if len(built["user"]):
      shard_files.append((shard, os.path.join(spill_dir, f"lists-{shard:05d}.npz")))
      np.savez(shard_files[-1][1], **built)
      start_times.append(built["start_time"])
    del log, built
    done = (shard + 1) / num_shards
    logging.info("lists: shard %d/%d done, %d lists so far, ETA %.0fs", shard + 1,
                 num_shards, sum(len(t) for t in start_times),
                 (time.time() - t_lists) * (1 - done) / done)
  name = f"{stream.name} ({config.lists.protocol} lists)"
  if not start_times:
    raise DataError(f"{name}: no list could be built")
  splits = lists.time_splits(end, np.concatenate(start_times), config.lists)
  files: dict[str, list[str]] = {s: [] for s in lists.SPLITS}
  for shard, path in shard_files:   # each shard's lists, split by the global cuts
    with np.load(path) as built:
      out = lists.assign(dict(built), splits)
    os.remove(path)
    for split, arrays in out.items():
      stats.add_split(split, arrays)
      if len(arrays["user"]):
        files[split].append(os.path.join(spill_dir, f"lists-{split}-{shard:05d}.npz"))
        np.savez(files[split][-1], **arrays)
  seconds["lists"] = time.time() - t0 - sum(seconds.values())
  report = {"protocol": config.lists.protocol, "time_splits": dataclasses.asdict(splits),
            "retriever_rows": vocab.hist.rows_before(splits.retriever_end),
            "shards": num_shards, **stats.report(), "retriever": retriever_report,
            "rows": vocab.rows, "users": vocab.num_users - 1,
            "items": vocab.num_items - 1, "seconds": time.time() - t0,
            "stage_seconds": seconds}
  lists.check_report(report, name, config.lists.protocol)
  return Built(files=files, meta={
      "report": report, "num_items": vocab.num_items, "num_users": vocab.num_users,
      "user_feature_vocab": list(stream.user_feature_vocab),
      "item_feature_vocab": list(stream.item_feature_vocab), "name": name,
      "is_real": stream.is_real})


def feature_counts(dataset: str, variant: str) -> tuple[int, int]:
  """Categorical user and item feature columns the loaders produce."""
  if dataset == "kuairand":
    return len(kuairand.USER_FEATURES), len(kuairand.VIDEO_FEATURES)
  if dataset == "amazon_books":
    return 0, 0
  return len(movielens.USER_FEATURES), 1


def list_features(**sizes) -> tfds.features.FeaturesDict:
  """The TFDS features of a list data set (``batch.SCHEMA``; ``sizes`` as
  ``batch.array_shapes`` takes them): ours and own lists' alike.

  A field with an empty dimension (no feature columns: Amazon-Books) is left out:
  TFDS cannot decode an empty array under a leading dimension of unknown size.
  ``list_records`` skips it and ``load_splits`` gives it back, zero-wide.
  """
  shapes = batch_lib.array_shapes(**sizes)
  return tfds.features.FeaturesDict({
      f: tfds.features.Tensor(shape=shapes[f], dtype=batch_lib.SCHEMA[f].dtype)
      for f in FIELDS if 0 not in shapes[f]})


def list_records(files: list[str]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
  """TFDS examples from spilled ``.npz`` splits, ``_LISTS_PER_RECORD`` lists a record."""
  for f, path in enumerate(files):
    with np.load(path) as split:   # zero-wide fields are not stored (list_features)
      arrays = {k: split[k] for k in FIELDS if 0 not in split[k].shape[1:]}
    for start in range(0, len(arrays["user"]), _LISTS_PER_RECORD):
      yield f"{f:05d}-{start:09d}", {k: v[start:start + _LISTS_PER_RECORD]
                                     for k, v in arrays.items()}


@dataclasses.dataclass
class ListsConfig(tfds.core.BuilderConfig):
  data: DataConfig = DataConfig()


class DnrLists(raw.Preparation, tfds.core.GeneratorBasedBuilder,
               skip_registration=True):
  """Prepared reranking lists, one config per ``cache_key`` of a ``DataConfig``.

  ``spill_dir`` must be set (``prepare_lists`` does) before preparing: the build
  writes its intermediate files there.
  """

  VERSION = tfds.core.Version(LISTS_VERSION)

  def __init__(self, *, data_config: DataConfig, **kwargs):
    name = f"{data_config.dataset}-{data_config.variant}-{cache_key(data_config)}"
    kwargs.setdefault("data_dir", data_dir(data_config))
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=ListsConfig(name=name, data=data_config,
                                        description="dnr_jax reranking lists"), **kwargs)
    self.spill_dir: str | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config.data
    h, n = c.lists.history_size, c.lists.list_size
    fu, fi = feature_counts(c.dataset, c.variant)
    return self.dataset_info_from_configs(
        features=list_features(list_size=n, history_size=h, num_user_features=fu,
                               num_item_features=fi),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.spill_dir is None:
      raise RuntimeError("DnrLists.spill_dir is not set; use prepare_lists()")
    # Before the build: a file that changes while it is read is then seen as changed.
    sources = raw_builder(self.builder_config.data).source_fingerprint()
    built = build(self.builder_config.data, self.spill_dir)
    self.info.metadata.update(built.meta)
    self.info.metadata["source_fingerprint"] = sources
    self.info.metadata["data_config"] = json.loads(json.dumps(dataclasses.asdict(
        self.builder_config.data), default=str))
    return {name: self._generate_examples(files) for name, files in built.files.items()}

  def _generate_examples(self, files: list[str]
                         ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    return list_records(files)


def prepare_lists(config: DataConfig, *, on_disk=()) -> types.PreparedLists:
  """The lists of ``config``: from the cache, or built and cached (see module doc).

  Splits named in ``on_disk`` (``("train",)`` for ``--input=disk``) stay on disk as
  ``ListRecords`` (``disk_split``) instead of being loaded.
  """
  config.validate()
  builder = DnrLists(data_config=config)
  folder = os.path.dirname(builder.data_dir)
  what = f"lists {builder.builder_config.name}"
  # Read under the shared lock: a process that finds the sources changed deletes the
  # lists under the exclusive one, never while they are being loaded (integrity).
  with integrity.reading(folder, what):
    splits = _load_if_current(builder, config, on_disk)
  if splits is None:
    with integrity.preparing(folder, what):
      if builder.is_prepared():
        changed = integrity.changes(builder.info.metadata.get("source_fingerprint"),
                                    raw_builder(config).source_fingerprint())
        if changed:
          logging.warning("the source files of the cached lists %s changed (%s); "
                          "preparing them again", builder.data_dir, "; ".join(changed))
          shutil.rmtree(builder.data_dir)
          builder = DnrLists(data_config=config)
      if builder.is_prepared():   # another process prepared them meanwhile
        logging.info("reusing the cached lists %s", builder.data_dir)
      else:
        logging.info("preparing lists %s (cached for later runs)", builder.data_dir)
        # Inside the locked folder: a killed run's spill is deleted by the next one.
        spill = os.path.join(folder, integrity.INCOMPLETE_PREFIX + "spill")
        os.makedirs(spill)
        try:
          builder.spill_dir = spill
          raw.download_and_prepare(builder, tfds.download.DownloadConfig(
              try_download_gcs=False))
        finally:
          shutil.rmtree(spill, ignore_errors=True)
    with integrity.reading(folder, what):
      builder = DnrLists(data_config=config)   # as now on disk
      if not builder.is_prepared():
        raise DataError(f"{builder.data_dir}: the lists were deleted by another "
                        "process while this one was about to read them; run again")
      splits = load_splits(builder, on_disk=on_disk)
  meta = builder.info.metadata
  data = types.PreparedLists(
      splits=splits, num_items=int(meta["num_items"]), num_users=int(meta["num_users"]),
      user_feature_vocab=tuple(meta["user_feature_vocab"]),
      item_feature_vocab=tuple(meta["item_feature_vocab"]), report=dict(meta["report"]),
      name=meta["name"], is_real=bool(meta["is_real"]))
  _log_report(data)
  return data


def load_splits(builder: tfds.core.DatasetBuilder, names=lists.SPLITS, *,
                on_disk=()) -> dict[str, Any]:
  """The prepared list splits ``names`` of ``builder`` (ours or own lists') in memory,
  but those named in ``on_disk``: a ``ListRecords`` file each (``disk_split``)."""
  splits = {}
  for name in names:
    if name in on_disk:
      splits[name] = disk_split(builder, name)
      continue
    source = builder.as_data_source(split=name)
    blocks = [source[i] for i in range(len(source))]
    splits[name] = _with_zero_wide(
        {f: np.concatenate([np.asarray(b[f]) for b in blocks])
         for f in FIELDS if f in blocks[0]})
  return splits


def _with_zero_wide(split: dict) -> dict[str, np.ndarray]:
  """``split`` with the zero-wide feature fields ``list_features`` leaves out."""
  shapes = batch_lib.array_shapes(
      list_size=split["items"].shape[1], history_size=split["history"].shape[1],
      num_user_features=0, num_item_features=0, batch=len(split["items"]))
  return {f: np.asarray(split[f]) if f in split else
          np.zeros(shapes[f], batch_lib.SCHEMA[f].dtype) for f in FIELDS}


def disk_split(builder: tfds.core.DatasetBuilder, name: str) -> records_lib.ListRecords:
  """Split ``name`` of ``builder`` as a list-records file (one list a record, for
  training from disk), written beside the TFDS files on first use by streaming the
  split one TFDS record (1,024 lists) at a time; it goes with them when the cache
  is deleted."""
  path = os.path.join(os.fspath(builder.data_dir), f"{name}.list_records")
  if os.path.exists(path):
    try:
      return records_lib.ListRecords(path)
    except DataError as e:   # a damaged or half-replaced file: written again
      logging.warning("%s; writing it again", e)
  source = builder.as_data_source(split=name)
  logging.info("writing the %s split (%d records of up to %d lists) as list records "
               "for --input=disk: %s", name, len(source), _LISTS_PER_RECORD, path)
  records_lib.write_list_records(path, (_with_zero_wide(source[i])
                                        for i in range(len(source))))
  return records_lib.ListRecords(path)


def _load_if_current(builder: "DnrLists", config: DataConfig, on_disk=()):
  """The cached lists' splits, or None when they are missing or their sources changed."""
  if not builder.is_prepared() or integrity.changes(
      builder.info.metadata.get("source_fingerprint"),
      raw_builder(config).source_fingerprint()):
    return None
  logging.info("reusing the cached lists %s", builder.data_dir)
  return load_splits(builder, on_disk=on_disk)


def _log_report(data: types.PreparedLists) -> None:
  r = data.report
  if not data.is_real:
    logging.warning("DATA: %s is GENERATED, NOT the real data", data.name)
  logging.info("lists of %s: %d rows, %d users, %d items after the k-core; retriever "
               "(%s) held-out AUC %.4f", data.name, r.get("rows", -1), r.get("users", -1),
               r.get("items", -1), r.get("retriever", {}).get("kind", "mf"),
               r.get("retriever", {}).get("heldout_auc", float("nan")))
  for split in ("train", "valid", "test"):
    s = r[split]
    logging.info("  %-5s %7d lists, %.2f positives/list, %d without a positive, raw "
                 "retriever score AUC %.4f", split, s["lists"], s["positives_per_list"],
                 s["lists_without_positive"], s["raw_score_auc"])
