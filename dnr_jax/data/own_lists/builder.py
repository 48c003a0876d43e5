"""Your own lists as a cached TFDS data set: ``prepare_own_lists`` and ``DnrOwnLists``.

The lists file (and interactions file) in the format of ``dnr_jax.data.own_lists`` is
the builder's manual input: nothing is downloaded. Preparation

1. fits the ``Vocabulary`` on the files and saves it beside the prepared data
   (``<builder dir>/vocab/vocab.json``; the report's ``vocab_dir`` says where);
2. streams the lists through ``read_lists`` (labels required) into chunk files in a
   spill directory, so memory stays bounded by a chunk (plus one int8 and one time
   per list);
3. splits them (``split`` column, time or file order; ``OwnListsConfig.split``) and
   writes the ``train`` / ``valid`` / ``test`` splits.

The result is a versioned TFDS data set, ``dnr_own_lists``, whose config name is a
hash (``cache_key``) of everything that shapes the arrays: the config, the files'
paths, sizes and modification times, ``FORMAT_VERSION`` and ``OWN_LISTS_VERSION``. A
second run on unchanged files starts at once; an edited file is prepared again. TFDS
writes into an ``incomplete.*`` directory renamed at the end (vocabulary included), so
an interrupted preparation never looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from dnr_jax.data import lists as lists_lib
from dnr_jax.data import prepare, raw, types
from dnr_jax.data.own_lists.format import (FORMAT_VERSION, SPLITS, OwnListsConfig,
                                           check_path, feature_columns)
from dnr_jax.data.own_lists.histories import InteractionHistory
from dnr_jax.data.own_lists.reader import ReadStats, read_lists
from dnr_jax.data.own_lists.sources import header, row_count
from dnr_jax.data.own_lists.vocabulary import fit_vocabulary
from dnr_jax.errors import DataError

# Bump when the arrays built from the same files change: older caches are rebuilt.
OWN_LISTS_VERSION = "1.0.0"


def _data_dir(config: OwnListsConfig) -> str:
  return os.path.expanduser(config.data_dir or raw.default_data_dir())


def _fingerprint(path: str | None) -> Any:
  if not path:
    return None
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cache_key(config: OwnListsConfig) -> str:
  """The hash naming the prepared lists: config, files (path, size, mtime), versions."""
  fields = dataclasses.asdict(config)
  for where in ("lists", "interactions", "data_dir", "chunk_rows"):
    fields.pop(where)
  blob = {"config": fields, "lists": _fingerprint(config.lists),
          "interactions": _fingerprint(config.interactions),
          "format": FORMAT_VERSION, "version": OWN_LISTS_VERSION}
  return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def is_generated(path: str) -> bool:
  """Whether ``path`` lies beside a ``NOT_REAL_DATA`` marker (a generated example)."""
  return os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)),
                                     raw.NOT_REAL_MARKER))


def _split_mode(config: OwnListsConfig, names: list[str]) -> str:
  mode = config.split
  if mode == "auto":
    mode = "column" if "split" in names else "time" if "time" in names else \
        "file_order"
  need = {"column": "split", "time": "time"}.get(mode)
  if need and need not in names:
    raise DataError(f"{config.lists}: missing column {need!r} (split={mode!r}); the "
                    f"header has {names}")
  if mode == "file_order":
    logging.warning("%s: no 'split' or 'time' column: the last %.0f%% of the lists in "
                    "file order are test, the %.0f%% before them valid", config.lists,
                    100 * config.test_fraction, 100 * config.valid_fraction)
  return mode


def _time_cuts(times: np.ndarray, config: OwnListsConfig, path: str
               ) -> tuple[float, float]:
  """``(valid_start, test_start)``: the project's time split (``lists.time_splits``)
  on list times; lists served at a cut's time go with it."""
  t = np.sort(times)
  n = len(t)
  n_test = max(1, int(round(n * config.test_fraction)))
  n_valid = max(1, int(round(n * config.valid_fraction)))
  if n < n_test + n_valid + 1:
    raise DataError(f"{path}: only {n} lists: too few for a train, a valid and a test "
                    "split")
  return float(t[n - n_test - n_valid]), float(t[n - n_test])


class VocabularyShares:
  """What the vocabulary's bounds cost the lists: the share of candidates, of
  positives and of lists whose id fell into the unknown row 0 or a row several ids
  share (``OwnListsConfig.min_id_count`` / ``id_buckets``)."""

  def __init__(self, vocab):
    self.vocab = vocab
    self.counts = dict.fromkeys(
        ("candidates", "positives", "lists", "candidates_unknown", "positives_unknown",
         "lists_user_unknown", "candidates_shared", "positives_shared",
         "lists_user_shared"), 0)

  def add(self, arrays) -> None:
    c = self.counts
    mask, items = arrays["mask"], arrays["items"]
    positive = mask & (arrays["labels"] > 0)
    c["candidates"] += int(mask.sum())
    c["positives"] += int(positive.sum())
    c["lists"] += len(items)
    c["candidates_unknown"] += int((mask & (items == 0)).sum())
    c["positives_unknown"] += int((positive & (items == 0)).sum())
    c["lists_user_unknown"] += int((arrays["user"] == 0).sum())
    shared_items = self.vocab.shared_rows("item")
    if shared_items is not None:
      c["candidates_shared"] += int((mask & shared_items[items]).sum())
      c["positives_shared"] += int((positive & shared_items[items]).sum())
    shared_users = self.vocab.shared_rows("user")
    if shared_users is not None:
      c["lists_user_shared"] += int(shared_users[arrays["user"]].sum())

  def report(self) -> dict[str, Any]:
    c, v = self.counts, self.vocab
    share = lambda a, b: c[a] / c[b] if c[b] else 0.0   # pylint: disable=unnecessary-lambda-assignment
    mode = ("hashed" if v.buckets else "min_count" if v.min_count > 1 else "every id")
    out = {"mode": mode, "min_id_count": v.min_count, "id_buckets": v.buckets,
           "tables": v.stats, **c}
    for what in ("unknown", "shared"):
      out[f"candidates_{what}_share"] = share(f"candidates_{what}", "candidates")
      out[f"positives_{what}_share"] = share(f"positives_{what}", "positives")
      out[f"lists_user_{what}_share"] = share(f"lists_user_{what}", "lists")
    return out


@dataclasses.dataclass
class Built:
  """What ``build`` made: list files per split (in the spill directory), metadata."""
  files: dict[str, list[str]]
  meta: dict[str, Any]


def build(config: OwnListsConfig, spill_dir: str, vocab_dir: str) -> Built:
  """Prepares ``config``'s files (no cache): vocabulary into ``vocab_dir``, split list
  files into ``spill_dir``; memory bounded by a chunk."""
  t0 = time.time()
  path = check_path(config.lists, "lists")
  names = header(path)
  mode = _split_mode(config, names)
  vocab = fit_vocabulary(config)
  vocab.save(vocab_dir)
  logging.info("vocabulary of %s: %d user rows, %d item rows (beside padding), user "
               "features %s, item features %s", path, vocab.num_users - 1,
               vocab.num_items - 1,
               dict(zip(vocab.user_features, vocab.user_feature_vocab)),
               dict(zip(vocab.item_features, vocab.item_feature_vocab)))
  seconds = {"vocabulary": time.time() - t0}
  history = (InteractionHistory.load(config.interactions, vocab, config)
             if config.interactions else None)
  seconds["interactions"] = time.time() - t0 - sum(seconds.values())
  total = ReadStats()
  chunk_files, keys = [], []
  size, total_rows, last_log = os.path.getsize(path), row_count(path), 0.0
  bounds = VocabularyShares(vocab)
  for i, chunk in enumerate(read_lists(path, vocab=vocab, config=config,
                                       history=history, require_labels=True)):
    total += chunk.stats
    bounds.add(chunk.arrays)
    chunk_files.append(os.path.join(spill_dir, f"chunk-{i:05d}.npz"))
    np.savez(chunk_files[-1], **chunk.arrays)
    if mode == "column":
      index = {name: i for i, name in enumerate(SPLITS)}
      keys.append(np.array([index[s] for s in chunk.splits], np.int8))
    elif mode == "time":
      keys.append(chunk.times)
    if time.time() - last_log > 5:
      last_log = time.time()
      # A running count: the share of the file is known for Parquet (its footer
      # has the row count), a CSV file's size is all there is before the end.
      share = (f", {100 * total.rows / total_rows:.0f}% of the file" if total_rows
               else f" of a {size / 1e6:.1f} MB file")
      logging.info("%s: %d lists so far (%d rows read%s; %.0f rows/s)", path,
                   total.lists, total.rows, share,
                   total.rows / max(last_log - t0, 1e-9))
  seconds["lists"] = time.time() - t0 - sum(seconds.values())
  report: dict[str, Any] = {"format_version": FORMAT_VERSION, "split_by": mode}
  if mode == "column":
    which = np.concatenate(keys)
  else:
    t = np.concatenate(keys) if mode == "time" else np.arange(total.lists,
                                                             dtype=np.float64)
    valid_start, test_start = _time_cuts(t, config, path)
    which = np.where(t < valid_start, 0, np.where(t < test_start, 1, 2)).astype(np.int8)
    report["time_splits"] = {"valid_start": valid_start, "test_start": test_start}
  stats = lists_lib.ListStats()
  files: dict[str, list[str]] = {s: [] for s in SPLITS}
  start = 0
  for i, chunk_file in enumerate(chunk_files):
    with np.load(chunk_file) as arrays:
      arrays = dict(arrays)
    os.remove(chunk_file)
    part = which[start:start + len(arrays["user"])]
    start += len(part)
    for s, split in enumerate(SPLITS):
      sub = {k: v[part == s] for k, v in arrays.items()}
      stats.add_split(split, sub)
      if len(sub["user"]):
        files[split].append(os.path.join(spill_dir, f"{split}-{i:05d}.npz"))
        np.savez(files[split][-1], **sub)
  name = config.name or f"own lists {os.path.basename(path)}"
  is_real = not is_generated(path)
  if not is_real:
    name += " (GENERATED example, NOT the real data)"
  report.update({k: v for k, v in stats.report().items()
                 if k not in ("short_lists_dropped", "list_rows")})   # other protocols'
  report.update({"read": total.as_dict(), "users": vocab.num_users - 1,
                 "items": vocab.num_items - 1, "lists_file": path,
                 "interactions_file": config.interactions,
                 "history_source": ("interactions" if history else "history column"
                                    if "history" in names else "none"),
                 "vocabulary": bounds.report(),
                 "seconds": time.time() - t0, "stage_seconds": seconds})
  if history is not None:
    report["interactions"] = history.stats
  for split in SPLITS:
    if report[split]["lists"] == 0:
      raise DataError(f"{path}: no list in the {split} split (split by {mode}); "
                      "check the 'split' column or the lists' times")
  lists_lib.check_report(report, name, "own")
  return Built(files=files, meta={
      "report": report, "num_items": vocab.num_items, "num_users": vocab.num_users,
      "user_feature_vocab": list(vocab.user_feature_vocab),
      "item_feature_vocab": list(vocab.item_feature_vocab), "name": name,
      "is_real": is_real})


@dataclasses.dataclass
class OwnListsBuilderConfig(tfds.core.BuilderConfig):
  data: OwnListsConfig = OwnListsConfig()
  num_user_features: int = 0
  num_item_features: int = 0


class DnrOwnLists(raw.Preparation, tfds.core.GeneratorBasedBuilder,
                  skip_registration=True):
  """Prepared own lists, one config per ``cache_key`` of an ``OwnListsConfig``.

  ``spill_dir`` must be set (``prepare_own_lists`` does) before preparing.
  """

  VERSION = tfds.core.Version(OWN_LISTS_VERSION)
  RELEASE_NOTES = {"1.0.0": "Own lists, format 1.0."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Your lists file (and optional interactions file) in the format documented in "
      "the doc of dnr_jax/data/own_lists/__init__.py; OwnListsConfig.lists / "
      ".interactions (the experiments.lists flags --lists / --interactions) point at "
      "them.")

  def __init__(self, *, config: OwnListsConfig, **kwargs):
    ufeat, ifeat = feature_columns(header(config.lists), config)
    kwargs.setdefault("data_dir", _data_dir(config))
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=OwnListsBuilderConfig(
        name=f"own-{cache_key(config)}", data=config, num_user_features=len(ufeat),
        num_item_features=len(ifeat), description="dnr_jax own lists"), **kwargs)
    self.spill_dir: str | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    h, n = c.data.history_size, c.data.list_size
    return self.dataset_info_from_configs(
        features=prepare.list_features(list_size=n, history_size=h,
                                       num_user_features=c.num_user_features,
                                       num_item_features=c.num_item_features),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.spill_dir is None:
      raise RuntimeError("DnrOwnLists.spill_dir is not set; use prepare_own_lists()")
    # self.data_dir is TFDS's incomplete.* directory here: the vocabulary is renamed
    # into place with the lists.
    built = build(self.builder_config.data, self.spill_dir,
                  os.path.join(self.data_dir, "vocab"))
    self.info.metadata.update(built.meta)
    self.info.metadata["data_config"] = dataclasses.asdict(self.builder_config.data)
    return {name: self._generate_examples(files) for name, files in built.files.items()}

  def _generate_examples(self, files: list[str]
                         ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    return prepare.list_records(files)


def prepare_own_lists(config: OwnListsConfig, *, on_disk=()) -> types.PreparedLists:
  """Your lists as train / valid / test ``PreparedLists`` (cached; see module doc).

  Splits named in ``on_disk`` (``("train",)`` for ``--input=disk``) stay on disk as
  ``ListRecords`` instead of being loaded (``prepare.disk_split``).

  The report holds the read statistics (truncated / padded lists, unknown ids), the
  per-split counts and raw-score AUC, ``vocab_dir`` (the saved ``Vocabulary``) and
  ``data_config`` (the ``OwnListsConfig``), which a trained run needs to rerank later.
  """
  config.validate()
  check_path(config.lists, "lists")
  if config.interactions:
    check_path(config.interactions, "interactions")
  builder = DnrOwnLists(config=config)
  if builder.is_prepared():
    logging.info("reusing the prepared lists %s", builder.data_dir)
  else:
    logging.info("preparing own lists %s into %s (cached for later runs)", config.lists,
                 builder.data_dir)
    os.makedirs(_data_dir(config), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dnr_own_lists_spill_",
                                     dir=_data_dir(config)) as spill:
      builder.spill_dir = spill
      raw.download_and_prepare(builder, tfds.download.DownloadConfig(
          try_download_gcs=False, manual_dir=os.path.dirname(
              os.path.abspath(config.lists))))
  meta = builder.info.metadata
  splits = prepare.load_splits(builder, SPLITS, on_disk=on_disk)
  report = dict(meta["report"])
  report["vocab_dir"] = os.path.join(os.fspath(builder.data_dir), "vocab")
  report["data_config"] = dataclasses.asdict(config)
  data = types.PreparedLists(
      splits=splits, num_items=int(meta["num_items"]), num_users=int(meta["num_users"]),
      user_feature_vocab=tuple(meta["user_feature_vocab"]),
      item_feature_vocab=tuple(meta["item_feature_vocab"]), report=report,
      name=meta["name"], is_real=bool(meta["is_real"]))
  _log_report(data)
  return data


def _log_report(data: types.PreparedLists) -> None:
  r = data.report
  if not data.is_real:
    logging.warning("DATA: %s is GENERATED, NOT the real data", data.name)
  read = r["read"]
  logging.info("lists of %s: %d lists, %d users, %d items; %d lists longer than n cut "
               "(%d candidates dropped), %d shorter padded, %d without history; split "
               "by %s; history from %s", data.name, read["lists"], r["users"],
               r["items"], read["truncated_lists"], read["truncated_candidates"],
               read["padded_lists"], read["lists_without_history"], r["split_by"],
               r["history_source"])
  v = r.get("vocabulary")
  if v and v["mode"] != "every id":
    how = (f"min_id_count={v['min_id_count']}" if v["mode"] == "min_count" else
           f"id_buckets={v['id_buckets']}")
    tables = "; ".join(
        f"{c}: {t['seen']:,} ids seen, {t['rows']:,} rows" + (
            f", {t['dropped']:,} below the count share row 0" if "dropped" in t else
            f", {t['ids_in_shared_rows']:,} ids in {t['shared_rows']:,} shared rows")
        for c, t in v["tables"].items())
    logging.info("bounded vocabulary (%s): %s; candidates in the unknown row %.2f%% "
                 "(positives %.2f%%), in shared rows %.2f%% (positives %.2f%%); lists "
                 "whose user is unknown %.2f%%, shares a row %.2f%%", how, tables,
                 100 * v["candidates_unknown_share"], 100 * v["positives_unknown_share"],
                 100 * v["candidates_shared_share"], 100 * v["positives_shared_share"],
                 100 * v["lists_user_unknown_share"], 100 * v["lists_user_shared_share"])
  if read["truncated_lists"]:
    logging.warning("%d of %d lists are longer than list_size and were cut to their "
                    "first candidates in upstream order", read["truncated_lists"],
                    read["lists"])
  for split in SPLITS:
    s = r[split]
    logging.info("  %-5s %7d lists, %.2f positives/list, %d without a positive, raw "
                 "upstream score AUC %.4f", split, s["lists"], s["positives_per_list"],
                 s["lists_without_positive"], s["raw_score_auc"])
