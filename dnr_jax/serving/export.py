"""The reranker as a ``jax.export`` artifact with a symbolic batch dimension.

``export_reranker`` writes ``reranker.jax`` and ``signature.json`` (every input's
name, dtype, shape, padding side and meaning, from ``batch.SCHEMA``), which
``serving.exported`` loads with jax and numpy alone.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import models
from dnr_jax.serving.bundle import BUNDLE_FORMAT, VOCABULARY_DIR, Bundle

EXPORT_FILE = "reranker.jax"
SIGNATURE_FILE = "signature.json"
# The exported function's inputs, in call order: every batch field but the labels.
EXPORT_INPUTS = tuple(f for f in batch_lib.FIELDS if f != "labels")


def _input_specs(config: config_lib.TrainConfig, list_size: int, history_size: int,
                 batch_dim) -> dict[str, tuple[tuple, Any]]:
  shapes = batch_lib.array_shapes(
      list_size=list_size, history_size=history_size,
      num_user_features=len(config.model.user_feature_vocab),
      num_item_features=len(config.model.item_feature_vocab), batch=batch_dim)
  return {k: (shapes[k], batch_lib.SCHEMA[k].dtype) for k in EXPORT_INPUTS}


def _scoring_function(bundle: Bundle):
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
                  "padding": batch_lib.SCHEMA[k].padding,
                  "meaning": batch_lib.SCHEMA[k].meaning} for k in EXPORT_INPUTS],
      "output": {"name": "logits", "dtype": "float32",
                 "shape": ["b", int(list_size)],
                 "meaning": "reranker score of each candidate, higher = shown first; "
                            "meaningless at padding (mask it)"},
      "ids": "0 is padding and unknown; raw ids map to ids with vocabulary/ (own "
             "lists)" if bundle.vocabulary_dir else
             "0 is padding; ids are the training data set's own",
      "vocabulary": VOCABULARY_DIR if bundle.vocabulary_dir else None,
      "config": config_lib.to_dict(bundle.config),
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
  # Right-aligned, as every reader writes histories (``batch.SCHEMA``).
  history_mask = np.arange(history_size) >= (history_size - hist_len)[:, None]
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
