"""The reranker as an ONNX model, for serving stacks that do not run JAX.

A ``jax.export`` artifact needs JAX to run; the places a reranker is served from
(ONNX Runtime in C++, Java or Python, Triton's ONNX Runtime backend) take ONNX.
jax2onnx traces the scoring function that ``serving/export.py`` exports (the
parameters baked in as initializers, the batch dimension symbolic, ``b``) into a
graph of standard ONNX operators at opset ``OPSET``, with LayerNorm as ONNX's
``LayerNormalization``; ``onnx_graph.simplify`` then folds the traced shape
arithmetic and turns attention's ``Einsum`` into ``MatMul``. ONNX Runtime is the
reference the graph is checked against, at export time (``check_arrays``) and in
``tests/onnx_export_test.py``.

What the backbones needed (jax2onnx 0.17): nothing for PRM, SetRank and PIER
(attention, LayerNorm, tanh-gelu, the embedding gathers and PIER's table of
relative-offset biases are standard operators; the hash dropout is the identity at
inference and leaves no node). DLCM's GRU is flax's lifted scan (``nn.RNN``), which
jax2onnx cannot trace, so the export builds ``make_reranker(..., export=True)``: the
GRU unrolled over the ``n`` positions, the same parameters and, in JAX, the same
logits bit for bit (``tests/models_test.py``).

The graph always computes in float32: a ``compute_dtype="bfloat16"`` run is served
at full precision (ONNX Runtime's CPU kernels have no bfloat16 matmuls), so its ONNX
logits are closer to the float32 reference than its own JAX scores are.

The graph checks no input. Ids must be valid (``0 <= id < vocabulary size``): JAX's
gather fills NaN past the table, ONNX Runtime's ``Gather`` raises there and wraps a
negative id around.

Needs the ``serve`` extra (``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dnr_jax import batch as batch_lib
from dnr_jax import errors
from dnr_jax import models
from dnr_jax.serving import onnx_graph
from dnr_jax.serving.bundle import Bundle

ONNX_FILE = "reranker.onnx"
# Opset 21 (ONNX 1.16, IR version 10): what ONNX Runtime 1.18 and later load, the
# runtime of Triton's containers since 24.05; nothing in the graph needs newer.
OPSET = 21
OUTPUT = "logits"
# ONNX Runtime vs JAX on the same lists: |a - b| <= ATOL + RTOL * |b| (float32
# kernels that sum in other orders differ by a few ulps; measured <= 2e-6).
ATOL = 1e-4
RTOL = 1e-4
# The public namespaces jax2onnx patches while it traces. Version 0.17 leaves some
# patches behind: ``jnp.cumsum`` stays a wrapper that rejects a positional axis
# (``metrics.py``'s ``jnp.cumsum(x, -1)``, and so ``serving.Scorer``, then fails in
# the same process), flax's ``MultiHeadAttention``, ``Conv`` and ``ConvLocal`` keep
# a patched ``__call__``. ``export_onnx`` puts every one back.
_PATCHED_NAMESPACES = ("jax.numpy", "jax.lax", "jax.nn", "jax.random", "flax.linen")
_MISSING = object()


def require_serve_extra():
  """jax2onnx and onnx (and onnxscript, which ``onnx_graph`` simplifies with), or a
  one-line error saying how to install them.

  Cheap enough (an import) for a binary to call before any work, so that a missing
  extra never costs a run its scoring.
  """
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnx  # pylint: disable=g-import-not-at-top
    import onnxscript  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.ConfigError(
        f"the ONNX export needs the serve extra ({e.name} is not installed): "
        "pip install -e \".[serve]\"") from e
  del onnxscript   # only its presence is checked here
  return jax2onnx, onnx


@contextlib.contextmanager
def _restored_namespaces():
  """Undoes what a jax2onnx conversion changed in ``_PATCHED_NAMESPACES``.

  Module attributes that changed get their old value back; the classes defined in
  those modules get their old attributes back and lose the ones added (an added
  ``__call__`` on a subclass shadows the inherited one).
  """
  saved = []
  for name, module in list(sys.modules.items()):
    if module is None or not any(name == p or name.startswith(p + ".")
                                 for p in _PATCHED_NAMESPACES):
      continue
    saved.append((module, dict(vars(module))))
    for value in list(vars(module).values()):
      if isinstance(value, type) and value.__module__ == name:
        saved.append((value, dict(vars(value))))
  try:
    yield
  finally:
    for owner, before in saved:
      now = vars(owner)
      for key, value in before.items():
        if now.get(key, _MISSING) is not value:
          setattr(owner, key, value)
      if isinstance(owner, type):
        for key in [k for k in now if k not in before and k != "__slotnames__"]:
          delattr(owner, key)


def _scoring_function(bundle: Bundle, inputs: Sequence[str]):
  """``(*inputs) -> logits``, the export formulation of the bundle's reranker."""
  model_config = dataclasses.replace(bundle.config.model, compute_dtype="float32")
  module = models.make_reranker(model_config, export=True)
  params = jax.tree.map(jnp.asarray, bundle.params)

  def score(*arrays):
    fields = dict(zip(inputs, arrays))
    # The reranker never reads the labels: any [b, n] float32 array fills the field
    # (zeros would add a node).
    fields["labels"] = fields["scores"]
    return module.apply({"params": params}, batch_lib.ListBatch(**fields), train=False)
  return score


def _input_specs(bundle: Bundle, inputs: Sequence[str], list_size: int,
                 history_size: int) -> list[jax.ShapeDtypeStruct]:
  (b,) = jax.export.symbolic_shape("b")
  m = bundle.config.model
  shapes = batch_lib.array_shapes(
      list_size=list_size, history_size=history_size,
      num_user_features=len(m.user_feature_vocab),
      num_item_features=len(m.item_feature_vocab), batch=b)
  return [jax.ShapeDtypeStruct(shapes[k], batch_lib.SCHEMA[k].dtype) for k in inputs]


def max_abs_difference(model_bytes: bytes, reference, arrays: Mapping[str, np.ndarray],
                       inputs: Sequence[str]) -> float:
  """ONNX Runtime's logits on ``arrays`` vs ``reference(*arrays)``: the max |diff|.

  Raises:
    RuntimeError: a difference over ``ATOL + RTOL * |reference|`` (a conversion
      bug, not the user's: it keeps its traceback).
  """
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
  feed = {k: np.asarray(arrays[k], batch_lib.SCHEMA[k].dtype) for k in inputs}
  got = session.run([OUTPUT], feed)[0]
  want = np.asarray(reference(*[feed[k] for k in inputs]))
  diff = np.abs(got - want)
  if not np.all(diff <= ATOL + RTOL * np.abs(want)):
    raise RuntimeError(
        f"the ONNX graph's logits differ from JAX's by up to {diff.max():.3g} "
        f"(tolerance {ATOL:g} + {RTOL:g} |logit|): a conversion bug, please report it")
  return float(diff.max())


def export_onnx(bundle: Bundle, path: str, *, inputs: Sequence[str], list_size: int,
                history_size: int, opset: int = OPSET,
                check_arrays: Optional[Mapping[str, np.ndarray]] = None,
                simplify: bool = True) -> dict:
  """Writes the reranker as an ONNX model to ``path``.

  Args:
    bundle: the trained reranker.
    path: the ``.onnx`` file to write (atomically).
    inputs: the graph's input names in order (the signature's); the output is
      ``logits`` ``[b, n]`` float32.
    list_size: ``n``.
    history_size: ``H``.
    opset: the ONNX opset.
    simplify: False writes the graph as jax2onnx traces it by default (flax's
      layer-norm formula, the shape arithmetic, ``Einsum``): a baseline for timing
      the simplified one, or for telling a conversion bug from a simplifier's.
    check_arrays: lists (``batch.FIELDS``) ONNX Runtime scores right after the
      export, against JAX on the same graph's function; None skips the check.

  Returns:
    What ``signature.json`` records under ``"onnx"``: the file, opset, IR
    version, input and output names, the converters' versions, the graph's node
    counts (``onnx_graph.simplify``) and the check.
  """
  jax2onnx, onnx = require_serve_extra()
  fn = _scoring_function(bundle, inputs)
  specs = dict(zip(inputs, _input_specs(bundle, inputs, list_size, history_size)))
  # jax2onnx reads the runtime batch size off the last input (of those with a ``b``)
  # for the broadcasts before the first operation: it must be one the graph keeps,
  # not a [b, n, 0] feature input of a model without features, which the Triton
  # copy of the graph drops. The graph's inputs are put back in ``inputs`` order.
  order = [k for k in inputs if 0 in specs[k].shape] + [
      k for k in inputs if 0 not in specs[k].shape]
  # jax2onnx's IR layer logs a warning per shape-less constant; they are harmless.
  serde_log = logging.getLogger("onnx_ir.serde")
  level = serde_log.level
  serde_log.setLevel(logging.ERROR)
  try:
    with _restored_namespaces():
      # LayerNorm as ONNX's LayerNormalization (one kernel) rather than the eight
      # nodes of flax's formula, which ONNX Runtime does not fuse.
      model = jax2onnx.to_onnx(
          lambda *arrays: fn(*[arrays[order.index(k)] for k in inputs]),
          inputs=[specs[k] for k in order], model_name="dnr_reranker", opset=opset,
          input_names=order, output_names=[OUTPUT],
          normalization_mode="prefer_native" if simplify else "auto")
  finally:
    serde_log.setLevel(level)
  if simplify:
    model, graph_stats = onnx_graph.simplify(model)
  else:
    graph_stats = {"traced_nodes": len(model.graph.node),
                   "nodes": len(model.graph.node), "einsums_rewritten": 0}
  graph_stats["simplified"] = bool(simplify)
  by_name = {}
  for value in model.graph.input:
    by_name[value.name] = onnx.ValueInfoProto()
    by_name[value.name].CopyFrom(value)
  del model.graph.input[:]
  model.graph.input.extend(by_name[k] for k in inputs if k in by_name)
  # The oldest IR version that carries this opset: older runtimes refuse newer IR.
  model.ir_version = min(model.ir_version,
                         onnx.helper.find_min_ir_version_for(model.opset_import))
  model.doc_string = ("DNR reranker (dnr-jax): logits [b, n] of the candidates; inputs "
                      "as in signature.json beside this file")
  del model.metadata_props[:]
  for key, value in (("dnr_jax.inputs", json.dumps(
      [{"name": k, "dtype": np.dtype(batch_lib.SCHEMA[k].dtype).name,
        "padding": batch_lib.SCHEMA[k].padding} for k in inputs])),
                     ("dnr_jax.backbone", bundle.config.model.backbone),
                     ("dnr_jax.score_usage", bundle.config.model.score_usage)):
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value
  onnx.checker.check_model(model)
  names = [i.name for i in model.graph.input]
  if names != list(inputs) or [o.name for o in model.graph.output] != [OUTPUT]:
    raise RuntimeError(f"the ONNX graph's inputs are {names}, not {list(inputs)}")
  data = model.SerializeToString()
  checked = None
  if check_arrays is not None:
    checked = {"lists": int(np.asarray(check_arrays["items"]).shape[0]),
               "max_abs_diff": max_abs_difference(data, jax.jit(fn), check_arrays,
                                                  inputs),
               "tolerance": f"{ATOL:g} + {RTOL:g} * |logit|"}
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return {"file": os.path.basename(path), "opset": int(opset),
          "ir_version": int(model.ir_version), "inputs": names, "output": OUTPUT,
          "batch_dim": "b", "compute_dtype": "float32",
          "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}" + (
              f", onnxscript {importlib.metadata.version('onnxscript')}"
              if simplify else ""),
          "graph": graph_stats, "check": checked}
