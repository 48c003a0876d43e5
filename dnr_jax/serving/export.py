"""The reranker as deployable files, each with a symbolic batch dimension.

``export_reranker`` writes ``signature.json`` (every input's name, dtype, shape,
padding side and meaning, from ``batch.SCHEMA``) and, by ``formats``:

* ``"jax"``: ``reranker.jax``, a ``jax.export`` artifact, which ``serving.exported``
  loads with jax and numpy alone;
* ``"onnx"``: ``reranker.onnx`` (``serving/onnx_export.py``), for ONNX Runtime, no
  JAX needed;
* ``"triton"``: the ONNX model as a Triton model repository, ``triton/<model>/``
  (``serving/triton_repository.py``); implies ``"onnx"``.

One signature and one vocabulary serve every format.
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
from dnr_jax.serving import onnx_export
from dnr_jax.serving import triton_repository
from dnr_jax.serving.bundle import BUNDLE_FORMAT, VOCABULARY_DIR, Bundle

EXPORT_FILE = "reranker.jax"
SIGNATURE_FILE = "signature.json"
FORMATS = ("jax", "onnx", "triton")
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


def check_formats(formats) -> tuple[str, ...]:
  """``formats`` as a tuple of known names (``"jax,onnx"`` is accepted too).

  Raises ``ConfigError`` (one line) on an unknown name, and for ``"onnx"`` or
  ``"triton"`` without the ``serve`` extra installed: a binary calls this before
  any work.
  """
  if isinstance(formats, str):
    formats = formats.split(",")
  out = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
  unknown = [f for f in out if f not in FORMATS]
  if unknown or not out:
    raise errors.ConfigError(f"export formats {list(formats)}: choose from "
                             f"{list(FORMATS)}")
  if "onnx" in out or "triton" in out:
    onnx_export.require_serve_extra()
  return out


def export_reranker(
    bundle: Bundle, directory: str, *, formats=("jax",),
    list_size: Optional[int] = None, history_size: Optional[int] = None,
    platforms=("cpu", "cuda"),
    triton_model_name: str = triton_repository.DEFAULT_MODEL_NAME,
    triton_max_batch_size: int = triton_repository.DEFAULT_MAX_BATCH_SIZE,
    triton_cpu_instances: int = 0, triton_intra_op_threads: int = 0) -> dict:
  """Writes the reranker into ``directory`` in each of ``formats``.

  The parameters are baked into every artifact as constants; the batch dimension is
  symbolic (``b``), ``n`` and ``H`` are those of the training lists (the bundle's
  ``meta``, unless given). Files:
  ``reranker.jax`` (``"jax"``: ``jax.export.deserialize`` it; exported for every
  platform of ``platforms`` that lowers here, at least the first),
  ``reranker.onnx`` (``"onnx"``: checked against JAX with ONNX Runtime on a few
  random lists before it is written), ``triton/<triton_model_name>/`` (``"triton"``,
  implies ``"onnx"``: ``config.pbtxt`` and ``1/model.onnx``, dynamic batching up to
  ``triton_max_batch_size`` lists; ``triton_cpu_instances`` and
  ``triton_intra_op_threads``, when > 0, pin the model's CPU instances and ONNX
  Runtime's threads per instance, as ``triton_repository.write_repository`` says),
  ``signature.json`` (inputs in call order with
  names, dtypes, shapes and meaning; the output; what each format wrote) and
  ``vocabulary/`` when the bundle has one. ``"onnx"`` and ``"triton"`` need the
  ``serve`` extra.

  Returns:
    The signature (as written to ``signature.json``).
  """
  from jax import export  # pylint: disable=g-import-not-at-top
  formats = check_formats(formats)
  list_size = list_size or bundle.meta.get("list_size")
  history_size = history_size or bundle.meta.get("history_size")
  if not list_size or not history_size:
    raise errors.CheckpointError(f"{bundle.directory or 'bundle'}: list_size and "
                                 "history_size unknown; pass them")
  (b,) = export.symbolic_shape("b")
  specs = _input_specs(bundle.config, list_size, history_size, b)
  exp = None
  if "jax" in formats:
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
  if exp is not None:
    tmp = os.path.join(directory, f"{EXPORT_FILE}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
      f.write(exp.serialize())
    os.replace(tmp, os.path.join(directory, EXPORT_FILE))
  if bundle.vocabulary_dir:
    shutil.rmtree(os.path.join(directory, VOCABULARY_DIR), ignore_errors=True)
    shutil.copytree(bundle.vocabulary_dir, os.path.join(directory, VOCABULARY_DIR))
  signature = {
      "format": BUNDLE_FORMAT,
      # The jax.export artifact (None when "jax" was not asked for).
      "file": EXPORT_FILE if exp is not None else None,
      "platforms": list(exp.platforms) if exp is not None else [],
      "formats": list(formats),
      "inputs": [{"name": k, "dtype": np.dtype(specs[k][1]).name,
                  "shape": ["b" if d is b else int(d) for d in specs[k][0]],
                  "padding": batch_lib.SCHEMA[k].padding,
                  "meaning": batch_lib.SCHEMA[k].meaning} for k in EXPORT_INPUTS],
      "output": {"name": "logits", "dtype": "float32",
                 "shape": ["b", int(list_size)],
                 "meaning": "reranker score of each candidate, higher = shown first; "
                            "meaningless at padding (mask it)"},
      "ids": "0 is padding and unknown; raw ids map to ids with vocabulary/ (own "
             "lists; with vocab.json's buckets > 0, user and item ids are hashed: "
             "1 + first 8 bytes of BLAKE2b(id), little-endian, mod buckets)"
             if bundle.vocabulary_dir else
             "0 is padding; ids are the training data set's own",
      "vocabulary": VOCABULARY_DIR if bundle.vocabulary_dir else None,
      "config": config_lib.to_dict(bundle.config),
      "meta": bundle.meta,
  }
  if "onnx" in formats or "triton" in formats:
    onnx_path = os.path.join(directory, onnx_export.ONNX_FILE)
    signature["onnx"] = onnx_export.export_onnx(
        bundle, onnx_path, inputs=EXPORT_INPUTS, list_size=list_size,
        history_size=history_size,
        check_arrays=example_arrays(bundle.config, 5, list_size, history_size))
    if "triton" in formats:
      signature["triton"] = triton_repository.write_repository(
          directory, onnx_path, signature, model_name=triton_model_name,
          max_batch_size=triton_max_batch_size, cpu_instances=triton_cpu_instances,
          intra_op_threads=triton_intra_op_threads)
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
