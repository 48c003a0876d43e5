"""The bundle: a trained reranker as a directory, everything reranking needs.

A bundle holds, so that the user never repeats a model flag:

* ``bundle.json``: the format version, the full ``TrainConfig`` (vocabulary sizes
  included; ``config.from_dict`` rebuilds it), the selected epoch and its validation
  metrics, the data set's name and, for own lists, the data config;
* ``params.msgpack``: the reranker parameters of the epoch *selected by validation
  NDCG@K* (``train``'s ``result["best_params"]``), not the last epoch's;
* ``vocabulary/``: the raw-id vocabulary of own-lists data (``dnr_jax.data.own_lists``),
  when the run had one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Mapping, Optional

import jax

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax.runtime import params_io

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
PARAMS_FILE = "params.msgpack"
VOCABULARY_DIR = "vocabulary"
# Where experiment runs keep their bundle: <run dir>/bundle/.
RUN_BUNDLE = "bundle"


@dataclasses.dataclass
class Bundle:
  """A trained reranker: its config, its selected parameters, its vocabulary.

  Attributes:
    config: the run's full configuration (vocabulary sizes of the data included),
      with ``model_parallel=1``: a bundle's tables are whole, however they were
      trained (``meta["trained_model_parallel"]`` keeps the run's value).
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
    config = config_lib.from_dict(result["config"])
    return cls(config=dataclasses.replace(config, model_parallel=1),
               params=result["best_params"],
               meta={"best_epoch": result["best_epoch"], "valid": result["valid"],
                     "test": result["test"], "data": result.get("data", {}),
                     "list_size": int(list_size), "history_size": int(history_size),
                     "trained_model_parallel": config.model_parallel},
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
    json.dump({"format": BUNDLE_FORMAT, "config": config_lib.to_dict(bundle.config),
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
  config = config_lib.from_dict(d["config"], where=f"{meta_path}: config")
  params = params_io.load(os.path.join(directory, PARAMS_FILE))
  vocab = os.path.join(directory, VOCABULARY_DIR)
  return Bundle(config=config, params=params, meta=d.get("meta", {}),
                data_config=d.get("data_config"),
                vocabulary_dir=vocab if d.get("has_vocabulary") else None,
                directory=directory)
