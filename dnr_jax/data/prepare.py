"""From raw files to cached reranking lists: ``DataConfig`` and ``prepare_lists``.

The stages, each a documented config value:

1. the raw TFDS data set (``kuairand`` / ``movielens``; ``sample`` = the generated
   KuaiRand-Pure-schema demo data, NOT the real data);
2. the label (KuaiRand ``is_click`` by default, ``long_view`` as an option; MovieLens
   rating >= 4) and the paper's k-core filter (20), on the time-sorted log;
3. the MF retriever, trained on the earliest ``lists.retriever_fraction`` of the
   timeline only (its held-out AUC goes into the report);
4. the lists (``lists.protocol``), from the later part only, split by time.

The result is cached as a versioned TFDS data set, ``dnr_lists``, whose config name is
a hash of everything that shapes the lists (the data config, ``LISTS_VERSION`` and the
raw data set's version), so a second run with the same config starts at once and any
change gives a new data set. The preparation report (counts, retriever AUC, raw-score
AUC per split) is kept in the data set's metadata and logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from dnr_jax.batch import FIELDS
from dnr_jax.data import kuairand, lists, movielens, preprocess, raw, samples, types
from dnr_jax.data import retriever as retriever_lib

# Bump when list construction changes: cached lists of older code are then rebuilt.
LISTS_VERSION = "1.0.0"
DATASETS = {"kuairand": tuple(kuairand.CONFIGS), "movielens": tuple(movielens.CONFIGS)}
_LISTS_PER_RECORD = 1024


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data, and how lists are made from it (see ``default_config``).

  Attributes:
    dataset / variant: ``kuairand`` (``sample``, ``pure``, ``1k``, ``27k``) or
      ``movielens`` (``100k``, ``1m``).
    source_dir: where the raw files or the official archive are (default:
      ``<data_dir>/manual/<dataset>-<variant>``; the sample is generated there).
    data_dir: where the TFDS data sets go (default ``raw.default_data_dir()``).
    download: fetch the official archive when ``source_dir`` lacks the files.
    label: KuaiRand's positive signal (``kuairand.LABELS``).
    rating_threshold: MovieLens ratings >= this are positive.
    include_random: keep KuaiRand's randomly exposed impressions.
    k_core: the paper's filter (users and items with fewer rows are dropped).
    lists / retriever: list protocol and retriever stage.
    sample: size and truth of the generated sample (``variant="sample"``).
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

  def validate(self) -> None:
    if self.dataset not in DATASETS:
      raise ValueError(f"data.dataset={self.dataset!r} is not one of {list(DATASETS)}")
    if self.variant not in DATASETS[self.dataset]:
      raise ValueError(f"data.variant={self.variant!r} is not one of "
                       f"{DATASETS[self.dataset]} for {self.dataset}")
    if self.dataset == "kuairand" and self.label not in kuairand.LABELS:
      raise ValueError(f"data.label={self.label!r} is not one of {kuairand.LABELS}")
    if self.dataset == "movielens" and self.label != DataConfig.label:
      raise ValueError(f"data.label={self.label!r} is KuaiRand's; MovieLens labels come "
                       "from data.rating_threshold")
    if not 1 <= self.rating_threshold <= 5:
      raise ValueError(f"data.rating_threshold={self.rating_threshold} must be in 1..5")
    if self.k_core < 1:
      raise ValueError(f"data.k_core={self.k_core} must be >= 1")
    self.lists.validate()
    self.retriever.validate()

  @property
  def is_sample(self) -> bool:
    return self.variant == "sample"


def default_config(dataset: str = "kuairand", variant: str = "sample",
                   **overrides) -> DataConfig:
  """The recommended config per data set: KuaiRand lists are real impressions
  (``exposure``); MovieLens has no impressions, so its lists are the retriever's top
  ``n`` labelled by the next ``window`` positive ratings (``retrieval``)."""
  protocol = "exposure" if dataset == "kuairand" else "retrieval"
  base = DataConfig(dataset=dataset, variant=variant,
                    lists=lists.ListConfig(protocol=protocol))
  return dataclasses.replace(base, **overrides)


def _data_dir(config: DataConfig) -> str:
  return os.path.expanduser(config.data_dir or raw.default_data_dir())


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                        ).hexdigest()[:16]


def cache_key(config: DataConfig) -> str:
  """The hash naming the cached lists: every field that shapes them, and versions."""
  fields = dataclasses.asdict(config)
  for where in ("source_dir", "data_dir", "download"):
    fields.pop(where)
  if not config.is_sample:
    fields.pop("sample")
  return _digest({"config": fields, "lists_version": LISTS_VERSION,
                  "raw_version": str(raw.RawBuilder.VERSION)})


def raw_builder(config: DataConfig) -> raw.RawBuilder:
  """The raw data set's builder (for the sample: generated on first use)."""
  data_dir = _data_dir(config)
  source = config.source_dir or os.path.join(
      data_dir, "manual", f"{config.dataset}-{config.variant}")
  builder_dir = data_dir
  if config.is_sample:
    # Each sample size is its own data set, so a changed SampleConfig is never served
    # from an older sample's cache.
    key = _digest(dataclasses.asdict(config.sample))
    source = config.source_dir or os.path.join(data_dir, "manual", f"kuairand-sample-{key}")
    builder_dir = os.path.join(data_dir, "samples", key)
    if not raw.find_files(source, [raw.NOT_REAL_MARKER]):
      logging.warning("generating the KuaiRand-Pure-schema sample in %s (NOT the real "
                      "data)", source)
      samples.write_kuairand(source, config.sample)
  cls = kuairand.Kuairand if config.dataset == "kuairand" else movielens.Movielens
  return cls(config=config.variant, data_dir=builder_dir, source_dir=source,
             download=config.download)


def load_interactions(config: DataConfig) -> types.Interactions:
  """The cleaned, time-sorted log of ``config`` (raw data set prepared if needed)."""
  config.validate()
  builder = raw.prepare(raw_builder(config))
  if config.dataset == "kuairand":
    return kuairand.to_interactions(builder, config.label, config.include_random)
  return movielens.to_interactions(builder, config.rating_threshold)


def train_retriever(log: types.Interactions, list_config: lists.ListConfig,
                    config: retriever_lib.RetrieverConfig):
  """MF on the positives of the retriever's part of the timeline only."""
  cut = lists.retriever_cutoff(log, list_config)
  pos = np.flatnonzero(log.label[:cut] > 0)
  logging.info("retriever: %d positives in the first %d of %d rows", len(pos), cut,
               log.num_rows)
  return retriever_lib.train(log.user[pos], log.item[pos], num_users=log.num_users,
                             num_items=log.num_items, config=config)


def build(config: DataConfig) -> types.PreparedLists:
  """Runs every stage (no cache): raw data, label, k-core, retriever, lists."""
  t0 = time.time()
  log = load_interactions(config)
  log = preprocess.k_core(log, config.k_core)
  logging.info("after the %d-core: %d rows, %d users, %d items", config.k_core,
               log.num_rows, log.num_users - 1, log.num_items - 1)
  params, retriever_report = train_retriever(log, config.lists, config.retriever)
  data = lists.build_lists(log, params, config.lists)
  data.report.update({
      "retriever": retriever_report, "rows": log.num_rows, "users": log.num_users - 1,
      "items": log.num_items - 1, "positive_rate": float(log.label.mean()),
      "seconds": time.time() - t0})
  for split in ("train", "valid", "test"):
    auc = data.report[split]["raw_score_auc"]
    if config.lists.protocol != "paper" and auc <= 0.5:
      logging.warning("%s: the raw retriever score has AUC %.3f <= 0.5 on %s lists: "
                      "scores are uninformative or inverted", data.name, auc, split)
  return data


def feature_counts(dataset: str, variant: str) -> tuple[int, int]:
  """Categorical user and item feature columns the loaders produce."""
  if dataset == "kuairand":
    return len(kuairand.USER_FEATURES), len(kuairand.VIDEO_FEATURES)
  return len(movielens.USER_FEATURES), 1


@dataclasses.dataclass
class ListsConfig(tfds.core.BuilderConfig):
  data: DataConfig = DataConfig()


class DnrLists(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepared reranking lists, one config per ``cache_key`` of a ``DataConfig``."""

  VERSION = tfds.core.Version(LISTS_VERSION)

  def __init__(self, *, data_config: DataConfig, **kwargs):
    name = f"{data_config.dataset}-{data_config.variant}-{cache_key(data_config)}"
    kwargs.setdefault("data_dir", _data_dir(data_config))
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=ListsConfig(name=name, data=data_config,
                                        description="dnr_jax reranking lists"), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    dtypes = {"user": np.int32, "history": np.int32, "history_mask": np.bool_,
              "items": np.int32, "scores": np.float32, "labels": np.float32,
              "mask": np.bool_, "user_features": np.int32, "item_features": np.int32}
    c = self.builder_config.data
    h, n = c.lists.history_size, c.lists.list_size
    fu, fi = feature_counts(c.dataset, c.variant)
    shapes = {"user": (None,), "history": (None, h), "history_mask": (None, h),
              "items": (None, n), "scores": (None, n), "labels": (None, n),
              "mask": (None, n), "user_features": (None, fu),
              "item_features": (None, n, fi)}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            f: tfds.features.Tensor(shape=shapes[f], dtype=dtypes[f]) for f in FIELDS}),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    data = build(self.builder_config.data)
    self.info.metadata.update({
        "report": data.report, "num_items": data.num_items, "num_users": data.num_users,
        "user_feature_vocab": list(data.user_feature_vocab),
        "item_feature_vocab": list(data.item_feature_vocab), "name": data.name,
        "is_real": data.is_real,
        "data_config": json.loads(json.dumps(dataclasses.asdict(
            self.builder_config.data), default=str))})
    return {name: self._generate_examples(split) for name, split in data.splits.items()}

  def _generate_examples(self, split: dict[str, np.ndarray]
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    n = len(split["user"])
    for i, start in enumerate(range(0, n, _LISTS_PER_RECORD)):
      yield i, {f: split[f][start:start + _LISTS_PER_RECORD] for f in FIELDS}


def prepare_lists(config: DataConfig) -> types.PreparedLists:
  """The lists of ``config``: from the cache, or built and cached (see module doc)."""
  config.validate()
  builder = DnrLists(data_config=config)
  if builder.is_prepared():
    logging.info("reusing the cached lists %s", builder.data_dir)
  else:
    logging.info("preparing lists %s (cached for later runs)", builder.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  meta = builder.info.metadata
  splits = {}
  for name in ("train", "valid", "test"):
    source = builder.as_data_source(split=name)
    blocks = [source[i] for i in range(len(source))]
    splits[name] = {f: np.concatenate([np.asarray(b[f]) for b in blocks])
                    for f in FIELDS}
  data = types.PreparedLists(
      splits=splits, num_items=int(meta["num_items"]), num_users=int(meta["num_users"]),
      user_feature_vocab=tuple(meta["user_feature_vocab"]),
      item_feature_vocab=tuple(meta["item_feature_vocab"]), report=dict(meta["report"]),
      name=meta["name"], is_real=bool(meta["is_real"]))
  _log_report(data)
  return data


def _log_report(data: types.PreparedLists) -> None:
  r = data.report
  if not data.is_real:
    logging.warning("DATA: %s is GENERATED, NOT the real data", data.name)
  logging.info("lists of %s: %d rows, %d users, %d items after the k-core; retriever "
               "held-out AUC %.4f", data.name, r.get("rows", -1), r.get("users", -1),
               r.get("items", -1), r.get("retriever", {}).get("heldout_auc", float("nan")))
  for split in ("train", "valid", "test"):
    s = r[split]
    logging.info("  %-5s %7d lists, %.2f positives/list, %d without a positive, raw "
                 "retriever score AUC %.4f", split, s["lists"], s["positives_per_list"],
                 s["lists_without_positive"], s["raw_score_auc"])
