"""A trained reranker as a thing to use: the bundle, scoring, files, ``jax.export``.

* ``bundle``: the trained reranker as a directory (config, selected parameters,
  vocabulary): ``Bundle``, ``save_bundle``, ``load_bundle``;
* ``scorer``: batch scoring on every local device with the training loop's own eval
  program (``Scorer``, ``score_lists``) and ``rerank`` (logits to ranks);
* ``rerank_files``: streamed reranking of an own-lists file to Parquet;
* ``export``: ``export_reranker``, a ``jax.export`` artifact with a symbolic batch,
  and (``formats``) the ONNX model and a Triton model repository;
* ``onnx_export``: the ONNX model (jax2onnx; the ``serve`` extra);
* ``triton_repository``: the ONNX model as a Triton Inference Server repository;
* ``exported``: loads the ``jax.export`` artifact with jax and numpy alone.

Names are imported on first use (PEP 562), so ``dnr_jax.serving.exported`` loads
neither Flax nor the models.
"""

import importlib

_EXPORTS = {
    "BUNDLE_JSON": "bundle", "Bundle": "bundle", "RUN_BUNDLE": "bundle",
    "find_bundle": "bundle", "load_bundle": "bundle", "save_bundle": "bundle",
    "Scorer": "scorer", "rerank": "scorer", "score_lists": "scorer",
    "EXPORT_FILE": "export", "SIGNATURE_FILE": "export", "example_arrays": "export",
    "export_reranker": "export", "FORMATS": "export", "check_formats": "export",
    "ONNX_FILE": "onnx_export",
    "ExportedReranker": "exported", "load_exported": "exported",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"dnr_jax.serving.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'dnr_jax.serving' has no attribute {name!r}")
