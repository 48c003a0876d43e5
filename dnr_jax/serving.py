"""A trained reranker as a thing to use: the bundle, batch scoring, and ``jax.export``.

A **bundle** is a directory that holds everything needed to rerank with a finished
run, so the user never repeats a model flag:

* ``bundle.json``: the format version, the full ``TrainConfig`` (vocabulary sizes
  included; ``config_from_dict`` rebuilds the dataclass), the selected epoch and its
  validation metrics, the data set's name and, for own lists, the data config;
* ``params.msgpack``: the reranker parameters of the epoch *selected by validation
  NDCG@K* (``train``'s ``result["best_params"]``), not the last epoch's;
* ``vocabulary/``: the raw-id vocabulary of own-lists data (``dnr_jax.data.own_lists``),
  when the run had one.

``Scorer`` runs a bundle's reranker across all local devices with the training
loop's own compiled eval program (``step.Runner.evaluate_params``), so its logits are
bit-identical to the ones the run was evaluated with. ``rerank`` turns logits into
ranks with the project's tie rule (ties by upstream position, ``metrics.rank_order``).
``Evaluation`` accumulates the training table's metrics over streamed chunks.
``export_reranker`` writes a ``jax.export`` artifact with a symbolic batch dimension
that ``dnr_jax.exported`` loads with jax and numpy alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import typing
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import metrics as metrics_lib
from dnr_jax import params_io
from dnr_jax import pipeline
from dnr_jax import step as step_lib

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
PARAMS_FILE = "params.msgpack"
VOCABULARY_DIR = "vocabulary"
# Where experiment runs keep their bundle: <run dir>/bundle/.
RUN_BUNDLE = "bundle"


# --- TrainConfig <-> JSON ----------------------------------------------------------


def config_to_dict(config: config_lib.TrainConfig) -> dict:
  return dataclasses.asdict(config)


def _from_dict(cls, d: Mapping[str, Any], where: str):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise errors.ConfigError(f"{where}: unknown config fields {unknown} (written by a "
                             "newer dnr-jax?)")
  hints = typing.get_type_hints(cls)
  out = {}
  for name, value in d.items():
    kind = hints[name]
    if dataclasses.is_dataclass(kind):
      value = _from_dict(kind, value, f"{where}.{name}")
    elif typing.get_origin(kind) is tuple:
      value = tuple(value)
    out[name] = value
  # Fields missing from an older file keep their defaults.
  return cls(**out)


def config_from_dict(d: Mapping[str, Any], where: str = "config"
                     ) -> config_lib.TrainConfig:
  """Rebuilds the ``TrainConfig`` that ``config_to_dict`` (or ``asdict``) wrote."""
  return _from_dict(config_lib.TrainConfig, d, where)


# --- the bundle --------------------------------------------------------------------


@dataclasses.dataclass
class Bundle:
  """A trained reranker: its config, its selected parameters, its vocabulary.

  Attributes:
    config: the run's full configuration (vocabulary sizes of the data included).
    params: the reranker parameters of the selected epoch (host arrays).
    meta: ``best_epoch``, ``valid`` (its validation metrics), ``data`` (name,
      is_real) and whatever else the run recorded.
    data_config: the own-lists data config (JSON-able dict), or ``None``.
    vocabulary_dir: the raw-id vocabulary folder, or ``None`` (data sets whose ids
      are already the model's, such as KuaiRand and MovieLens runs).
    directory: where the bundle was loaded from, if anywhere.
  """
  config: config_lib.TrainConfig
  params: Any
  meta: dict = dataclasses.field(default_factory=dict)
  data_config: Optional[dict] = None
  vocabulary_dir: Optional[str] = None
  directory: Optional[str] = None

  @classmethod
  def from_result(cls, result: Mapping[str, Any], *, list_size: int,
                  history_size: int, data_config: Optional[dict] = None,
                  vocabulary_dir: Optional[str] = None) -> "Bundle":
    """The bundle of a ``train.train_and_evaluate`` result (its selected epoch).

    ``list_size`` and ``history_size`` are the training lists' ``n`` and ``H`` (the
    shapes the reranker was trained on; the export needs them).
    """
    if result.get("best_params") is None:
      raise ValueError("the result has no best_params (a run with no epoch?)")
    return cls(config=config_from_dict(result["config"]), params=result["best_params"],
               meta={"best_epoch": result["best_epoch"], "valid": result["valid"],
                     "test": result["test"], "data": result.get("data", {}),
                     "list_size": int(list_size), "history_size": int(history_size)},
               data_config=data_config, vocabulary_dir=vocabulary_dir)

  def vocabulary(self):
    """The own-lists ``Vocabulary`` (raises ``CheckpointError`` if there is none)."""
    if not self.vocabulary_dir:
      raise errors.CheckpointError(
          f"{self.directory or 'bundle'}: no vocabulary (the run was not trained on "
          "own lists with experiments.lists)")
    from dnr_jax.data import own_lists  # pylint: disable=g-import-not-at-top
    return own_lists.Vocabulary.load(self.vocabulary_dir)


def save_bundle(directory: str, bundle: Bundle) -> str:
  """Writes ``bundle`` into ``directory`` (created; replaced if it was a bundle).

  Written into a temporary sibling folder renamed at the end, so a reader never sees
  half a bundle.

  Returns:
    ``directory``.
  """
  directory = os.path.abspath(directory)
  tmp = f"{directory}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  params_io.save(os.path.join(tmp, PARAMS_FILE), bundle.params)
  if bundle.vocabulary_dir:
    shutil.copytree(bundle.vocabulary_dir, os.path.join(tmp, VOCABULARY_DIR))
  with open(os.path.join(tmp, BUNDLE_JSON), "w") as f:
    json.dump({"format": BUNDLE_FORMAT, "config": config_to_dict(bundle.config),
               "meta": bundle.meta, "data_config": bundle.data_config,
               "has_vocabulary": bool(bundle.vocabulary_dir),
               "jax_version": jax.__version__,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              f, indent=2, default=str)
  if os.path.exists(directory):
    if not os.path.exists(os.path.join(directory, BUNDLE_JSON)):
      shutil.rmtree(tmp)
      raise errors.CheckpointError(f"{directory}: exists and is not a bundle; "
                                   "not overwriting it")
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


def find_bundle(path: str) -> str:
  """The bundle directory that ``path`` names: a bundle, a run, or a one-run workdir.

  Raises:
    CheckpointError: nothing there, or several runs to choose from (listed).
  """
  if not os.path.exists(path):
    raise errors.CheckpointError(f"--checkpoint={path}: no such file or directory")
  for candidate in (path, os.path.join(path, RUN_BUNDLE)):
    if os.path.isfile(os.path.join(candidate, BUNDLE_JSON)):
      return candidate
  found = []
  for root, dirs, files in os.walk(path):
    if BUNDLE_JSON in files and os.path.basename(root) == RUN_BUNDLE:
      found.append(os.path.dirname(root))
      dirs[:] = []
  if len(found) == 1:
    return os.path.join(found[0], RUN_BUNDLE)
  if found:
    runs = ", ".join(os.path.relpath(r, path) for r in sorted(found))
    raise errors.CheckpointError(f"--checkpoint={path} holds {len(found)} runs; name "
                                 f"one: {runs}")
  raise errors.CheckpointError(
      f"--checkpoint={path}: no trained reranker bundle there ({BUNDLE_JSON} not "
      "found; runs write one into <run dir>/bundle/ when they finish)")


def load_bundle(path: str) -> Bundle:
  """Loads the bundle at ``path`` (a bundle, or a run / workdir holding one run)."""
  directory = find_bundle(path)
  meta_path = os.path.join(directory, BUNDLE_JSON)
  try:
    with open(meta_path) as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f"{meta_path}: unreadable ({e})") from e
  if d.get("format") != BUNDLE_FORMAT:
    raise errors.CheckpointError(f"{meta_path}: bundle format {d.get('format')!r}, "
                                 f"this dnr-jax reads {BUNDLE_FORMAT}")
  config = config_from_dict(d["config"], where=f"{meta_path}: config")
  params = params_io.load(os.path.join(directory, PARAMS_FILE))
  vocab = os.path.join(directory, VOCABULARY_DIR)
  return Bundle(config=config, params=params, meta=d.get("meta", {}),
                data_config=d.get("data_config"),
                vocabulary_dir=vocab if d.get("has_vocabulary") else None,
                directory=directory)


# --- scoring -----------------------------------------------------------------------


class Scorer:
  """Scores lists with a bundle's reranker on every local device.

  Uses the training loop's compiled eval program (``Runner.evaluate_params``) on
  batches of ``batch_size`` lists (the run's evaluation batch by default), the last
  one padded with empty lists, so one shape compiles once and the logits are those
  the run was evaluated with.
  """

  def __init__(self, bundle: Bundle, *, devices: Optional[tuple] = None,
               batch_size: Optional[int] = None):
    self.config = bundle.config
    self.runner = step_lib.Runner(self.config, devices or ())
    d = self.runner.num_devices
    bs = batch_size or self.config.eval_batch_size or self.config.global_batch_size
    # A serving machine may have another device count than training had.
    self.batch_size = -(-bs // d) * d
    self.params = self.runner.put_state(jax.tree.map(jnp.asarray, bundle.params))

  def score(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Logits ``[N, n]`` of ``arrays`` (``batch.FIELDS``) and the metric sums.

    The sums are ``metrics.weighted_sums`` over the lists (meaningful when labels
    are present), for ``Evaluation``.
    """
    arrays = pipeline.complete(arrays)
    n = pipeline.num_lists(arrays)
    sums, logits = None, []
    for b in pipeline.prefetch(pipeline.batches(arrays, self.batch_size, shuffle=False),
                               size=2, transform=self.runner.put_batch):
      s, lg = self.runner.evaluate_params(self.params, b)
      sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
      logits.append(lg)
    if not logits:
      return np.zeros(arrays["items"].shape, np.float32), {}
    return (np.asarray(jax.device_get(jnp.concatenate(logits)))[:n],
            jax.device_get(sums))


def score_lists(bundle: Bundle, arrays: Mapping[str, np.ndarray], *,
                devices: Optional[tuple] = None,
                batch_size: Optional[int] = None) -> np.ndarray:
  """The reranker's logits ``[N, n]`` for the lists ``arrays`` (higher = better).

  Padded candidates get a logit too; mask them (``rerank`` does). Bit-identical to
  the training run's eval logits with the same devices and batch size (other
  per-device shapes may round differently, by float epsilons).
  """
  return Scorer(bundle, devices=devices, batch_size=batch_size).score(arrays)[0]


def rerank(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """New 1-based ranks ``[N, n]``: logit descending, ties by upstream position.

  The order of ``metrics.rank_order`` (the metrics' own), computed on the host;
  padded candidates get rank 0.
  """
  logits, mask = np.asarray(logits), np.asarray(mask, bool)
  n = logits.shape[-1]
  pos = np.broadcast_to(np.arange(n), logits.shape)
  order = np.lexsort((pos, -logits, ~mask), axis=-1)
  ranks = np.empty_like(order)
  np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1, n + 1), order.shape),
                    -1)
  return np.where(mask, ranks, 0).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("k", "map_normaliser"))
def _list_sums(logits, labels, mask, *, k: int, map_normaliser: str) -> dict:
  return metrics_lib.weighted_sums(metrics_lib.list_metrics(
      logits, labels, mask, k=k, map_normaliser=map_normaliser))


_global_auc = jax.jit(metrics_lib.global_auc)


class Evaluation:
  """The training table's metrics, accumulated over chunks of labelled lists.

  Per-list means come from the summed ``metrics.weighted_sums`` (as in
  ``train.evaluate``); the global AUC needs every valid candidate's logit and label,
  kept compactly (5 bytes a candidate); coverage keeps a seen-item bitmap.
  Two rows: the reranker, and the upstream order (its scores as logits, ties by
  position: ``train.evaluate_retriever``). Chunks of any size compile nothing new:
  the upstream sums run on fixed batches of ``batch_size`` lists.
  """

  ROWS = ("reranker", "upstream")

  def __init__(self, config: config_lib.TrainConfig, batch_size: int = 256):
    self.k, self.norm = config.eval_k, config.map_normaliser
    self.num_items = config.model.num_items
    self.batch_size = batch_size
    self._sums = {r: None for r in self.ROWS}
    self._logits = {r: [] for r in self.ROWS}
    self._labels: list[np.ndarray] = []
    self._seen = {r: np.zeros(self.num_items, bool) for r in self.ROWS}

  def _sums_of(self, logits, arrays) -> dict:
    sums = None
    # ("items" only counts the lists for pipeline.batches.)
    data = {"items": arrays["items"], "logits": np.asarray(logits, np.float32),
            "labels": arrays["labels"], "mask": arrays["mask"]}
    for b in pipeline.batches(data, self.batch_size, shuffle=False):
      s = _list_sums(b["logits"], b["labels"], b["mask"], k=self.k,
                     map_normaliser=self.norm)
      sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    return jax.device_get(sums)

  def add(self, arrays: Mapping[str, np.ndarray], logits: np.ndarray,
          sums: Optional[dict] = None) -> None:
    """Adds a chunk: its arrays, the reranker's logits and (optionally) its sums."""
    arrays = pipeline.complete(arrays)
    mask, labels = arrays["mask"], arrays["labels"]
    for row, lg in (("reranker", logits), ("upstream", arrays["scores"])):
      s = sums if row == "reranker" and sums else self._sums_of(lg, arrays)
      prev = self._sums[row]
      self._sums[row] = s if prev is None else jax.tree.map(np.add, prev, s)
      self._logits[row].append(np.asarray(lg, np.float32)[mask])
      shown = mask & (rerank(lg, mask) <= self.k)
      items = arrays["items"][shown]
      self._seen[row][items[items < self.num_items]] = True
    self._labels.append(labels[mask] > 0)

  def results(self) -> dict[str, dict[str, float]]:
    """``{"reranker": metrics, "upstream": metrics}``, keys as ``train.evaluate``."""
    out = {}
    labels = jnp.asarray(np.concatenate(self._labels))[None]
    for row in self.ROWS:
      if self._sums[row] is None:
        raise ValueError("Evaluation.results() before any chunk was added")
      m = {k: float(v) for k, v in metrics_lib.means(self._sums[row]).items()}
      lg = jnp.asarray(np.concatenate(self._logits[row]))[None]
      m["global_auc"] = float(_global_auc(lg, labels, jnp.ones_like(labels)))
      m["coverage"] = float(self._seen[row][1:].sum() / max(self.num_items - 1, 1))
      out[row] = m
    return out


# --- jax.export ----------------------------------------------------------------------

EXPORT_FILE = "reranker.jax"
SIGNATURE_FILE = "signature.json"
# The exported function's inputs, in call order: every batch field but the labels.
EXPORT_INPUTS = tuple(f for f in batch_lib.FIELDS if f != "labels")
_MEANING = {
    "user": "user id (vocabulary id; 0 = unknown / none)",
    "history": "the user's previous item ids, most recent last; 0 = padding / unknown",
    "history_mask": "True where history holds a real item",
    "items": "candidate item ids in upstream order (position 0 = upstream's first); "
             "0 = padding / unknown",
    "scores": "the upstream (retriever) score of each candidate, in [0, 1]; 0 for "
              "padding",
    "mask": "True for real candidates, False for padding (padding goes last)",
    "user_features": "categorical user feature ids, one column per feature",
    "item_features": "categorical item feature ids, one column per feature",
}


def _input_specs(config: config_lib.TrainConfig, list_size: int, history_size: int,
                 batch_dim) -> dict[str, tuple[tuple, Any]]:
  b, n, h = batch_dim, list_size, history_size
  fu, fi = len(config.model.user_feature_vocab), len(config.model.item_feature_vocab)
  return {"user": ((b,), np.int32), "history": ((b, h), np.int32),
          "history_mask": ((b, h), np.bool_), "items": ((b, n), np.int32),
          "scores": ((b, n), np.float32), "mask": ((b, n), np.bool_),
          "user_features": ((b, fu), np.int32),
          "item_features": ((b, n, fi), np.int32)}


def _scoring_function(bundle: Bundle):
  from dnr_jax import models  # pylint: disable=g-import-not-at-top
  module = models.make_reranker(bundle.config.model)
  params = jax.tree.map(jnp.asarray, bundle.params)

  def score(*inputs):
    fields = dict(zip(EXPORT_INPUTS, inputs))
    fields["labels"] = jnp.zeros(fields["scores"].shape, jnp.float32)
    return module.apply({"params": params}, batch_lib.ListBatch(**fields), train=False)
  return score


def export_reranker(bundle: Bundle, directory: str, *,
                    list_size: Optional[int] = None, history_size: Optional[int] = None,
                    platforms=("cpu", "cuda")) -> dict:
  """Writes the reranker as a serialized ``jax.export`` artifact into ``directory``.

  The parameters are baked into the artifact as constants; the batch dimension is
  symbolic (``b``), ``n`` and ``H`` are those of the training lists (the bundle's
  ``meta``, unless given). Files:
  ``reranker.jax`` (``jax.export.deserialize`` it), ``signature.json`` (inputs in
  call order with names, dtypes, shapes and meaning; the output; the platforms) and
  ``vocabulary/`` when the bundle has one. Exports for every platform of
  ``platforms`` that lowers here, at least the first.

  Returns:
    The signature (as written to ``signature.json``).
  """
  from jax import export  # pylint: disable=g-import-not-at-top
  list_size = list_size or bundle.meta.get("list_size")
  history_size = history_size or bundle.meta.get("history_size")
  if not list_size or not history_size:
    raise errors.CheckpointError(f"{bundle.directory or 'bundle'}: list_size and "
                                 "history_size unknown; pass them")
  (b,) = export.symbolic_shape("b")
  specs = _input_specs(bundle.config, list_size, history_size, b)
  args = [jax.ShapeDtypeStruct(specs[k][0], specs[k][1]) for k in EXPORT_INPUTS]
  fn = jax.jit(_scoring_function(bundle))
  try:
    exp = export.export(fn, platforms=tuple(platforms))(*args)
  except Exception:  # pylint: disable=broad-except
    if len(platforms) == 1:
      raise
    # One platform that does not lower here (no CUDA plug-in) must not stop the
    # export for the others.
    exp = export.export(fn, platforms=tuple(platforms[:1]))(*args)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f"{EXPORT_FILE}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(exp.serialize())
  os.replace(tmp, os.path.join(directory, EXPORT_FILE))
  if bundle.vocabulary_dir:
    shutil.rmtree(os.path.join(directory, VOCABULARY_DIR), ignore_errors=True)
    shutil.copytree(bundle.vocabulary_dir, os.path.join(directory, VOCABULARY_DIR))
  signature = {
      "format": BUNDLE_FORMAT,
      "file": EXPORT_FILE,
      "platforms": list(exp.platforms),
      "inputs": [{"name": k, "dtype": np.dtype(specs[k][1]).name,
                  "shape": ["b" if d is b else int(d) for d in specs[k][0]],
                  "meaning": _MEANING[k]} for k in EXPORT_INPUTS],
      "output": {"name": "logits", "dtype": "float32",
                 "shape": ["b", int(list_size)],
                 "meaning": "reranker score of each candidate, higher = shown first; "
                            "meaningless at padding (mask it)"},
      "ids": "0 is padding and unknown; raw ids map to ids with vocabulary/ (own "
             "lists)" if bundle.vocabulary_dir else
             "0 is padding; ids are the training data set's own",
      "vocabulary": VOCABULARY_DIR if bundle.vocabulary_dir else None,
      "config": config_to_dict(bundle.config),
      "meta": bundle.meta,
  }
  with open(os.path.join(directory, SIGNATURE_FILE), "w") as f:
    json.dump(signature, f, indent=2, default=str)
  return signature


def example_arrays(config: config_lib.TrainConfig, num_lists: int, list_size: int,
                   history_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random valid lists in the bundle's shapes (for tests and smoke checks)."""
  rng = np.random.default_rng(seed)
  m = config.model
  lengths = rng.integers(1, list_size + 1, num_lists)
  mask = np.arange(list_size) < lengths[:, None]
  hist_len = rng.integers(0, history_size + 1, num_lists)
  history_mask = np.arange(history_size) < hist_len[:, None]
  out = {
      "user": rng.integers(0, m.num_users, num_lists).astype(np.int32),
      "history": np.where(history_mask,
                          rng.integers(1, m.num_items, (num_lists, history_size)),
                          0).astype(np.int32),
      "history_mask": history_mask,
      "items": np.where(mask, rng.integers(1, m.num_items, (num_lists, list_size)),
                        0).astype(np.int32),
      "scores": np.where(mask, -np.sort(-rng.random((num_lists, list_size))),
                         0).astype(np.float32),
      "labels": np.where(mask, rng.random((num_lists, list_size)) < 0.3,
                         0).astype(np.float32),
      "mask": mask,
      # (A zero column is stacked and cut off when there are no features.)
      "user_features": np.stack(
          [rng.integers(0, v, num_lists) for v in m.user_feature_vocab]
          or [np.zeros(num_lists, np.int64)], -1
      )[..., :len(m.user_feature_vocab)].astype(np.int32),
      "item_features": np.stack(
          [rng.integers(0, v, (num_lists, list_size)) for v in m.item_feature_vocab]
          or [np.zeros((num_lists, list_size), np.int64)], -1
      )[..., :len(m.item_feature_vocab)].astype(np.int32),
  }
  return out

