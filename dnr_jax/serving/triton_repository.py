"""A Triton Inference Server model repository for the ONNX reranker.

Triton's ONNX Runtime backend serves ``<root>/<model>/1/model.onnx`` as described by
``<root>/<model>/config.pbtxt``; with the repository written here it serves the
reranker as is (``tritonserver --model-repository=<root>``). The config states every
input and the output with its Triton data type and its per-list dims (the batch
dimension is Triton's, through ``max_batch_size > 0``), and turns on dynamic
batching, so that single-list requests are batched on the server.

Two things differ from ``signature.json``, both because Triton's config schema
demands it:

* ``user`` is ``[b]`` (one id per list): Triton wants at least one dim besides the
  batch, so it is declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }`` (a client
  sends ``[b, 1]``, the model gets ``[b]``), Triton's documented form for a
  batch-only input;
* inputs with a zero-size dim (``user_features`` / ``item_features`` of a model
  without features) are left out of the config and of this copy of the graph:
  Triton rejects a dim of 0, and the graph never reads them.

The config is written as text here (exporting needs no Triton package);
``tests/onnx_export_test.py`` parses it into Triton's own ``ModelConfig`` protobuf
(``tritonclient.grpc.model_config_pb2``) and checks the fields.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from dnr_jax import errors

REPOSITORY_DIR = "triton"
CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
DEFAULT_MODEL_NAME = "dnr_reranker"
DEFAULT_MAX_BATCH_SIZE = 128
# How long Triton may hold a request to batch it with others: 100 µs costs little
# latency against a reranker's millisecond budget and batches concurrent requests.
DEFAULT_QUEUE_DELAY_US = 100
# numpy dtype names (signature.json's) -> Triton's data types.
TRITON_TYPES = {"int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL",
                "float32": "TYPE_FP32"}


def _io_block(name: str, dtype: str, dims: list[int]) -> str:
  lines = [f'    name: "{name}"', f"    data_type: {TRITON_TYPES[dtype]}"]
  if dims:
    lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
  else:
    # A batch-only tensor: one element per list, reshaped away for the model.
    lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
  return "  {\n" + "\n".join(lines) + "\n  }"


def config_text(signature: Mapping, *, model_name: str, max_batch_size: int,
                queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, cpu_instances: int = 0,
                intra_op_threads: int = 0) -> tuple[str, list[str]]:
  """``config.pbtxt`` for the signature's inputs and output; with ``cpu_instances``
  > 0 an ``instance_group`` of that many CPU instances, with ``intra_op_threads`` >
  0 ONNX Runtime's intra-op threads per instance (0: Triton's and ONNX Runtime's
  defaults).

  Returns:
    ``(text, names of the inputs declared)``; inputs with a zero-size dim are left
    out (the module docstring says why).
  """
  inputs, declared = [], []
  for spec in signature["inputs"]:
    dims = [int(d) for d in spec["shape"][1:]]        # shape[0] is the batch, "b"
    if 0 in dims:
      continue
    inputs.append(_io_block(spec["name"], spec["dtype"], dims))
    declared.append(spec["name"])
  out = signature["output"]
  output = _io_block(out["name"], out["dtype"], [int(d) for d in out["shape"][1:]])
  text = "\n".join([
      f'name: "{model_name}"',
      'platform: "onnxruntime_onnx"',
      f"max_batch_size: {int(max_batch_size)}",
      "input [\n" + ",\n".join(inputs) + "\n]",
      "output [\n" + output + "\n]",
      "dynamic_batching {",
      f"  max_queue_delay_microseconds: {int(queue_delay_us)}",
      "}",
  ])
  if cpu_instances:
    text += f"\ninstance_group [ {{ count: {int(cpu_instances)} kind: KIND_CPU }} ]"
  if intra_op_threads:
    text += ('\nparameters { key: "intra_op_thread_count" value: { string_value: '
             f'"{int(intra_op_threads)}" }} }}')
  return text + "\n", declared


def write_repository(directory: str, onnx_path: str, signature: Mapping, *,
                     model_name: str = DEFAULT_MODEL_NAME,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                     cpu_instances: int = 0, intra_op_threads: int = 0) -> dict:
  """Writes ``<directory>/triton/<model_name>/{config.pbtxt, 1/model.onnx}``.

  Args:
    directory: the export folder (the repository is its ``triton/`` folder).
    onnx_path: the exported ONNX model (``onnx_export.export_onnx``).
    signature: the export's signature (``signature.json``'s inputs and output).
    model_name: the Triton model name (letters, digits, ``_ . -``).
    max_batch_size: the largest batch Triton forms (> 0: the batch dimension is
      Triton's); the graph takes any.
    cpu_instances: model instances on CPU (0: Triton's default instance group).
    intra_op_threads: ONNX Runtime's intra-op threads per instance (0: its default,
      one per core, whose threads spin while they wait: on a small CPU machine
      shared with other work, 1 with one or two instances served the most
      (docs/serving_tuning.md, "Triton's ONNX Runtime backend")).

  Returns:
    What ``signature.json`` records under ``"triton"``.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", model_name or ""):
    raise errors.ConfigError(f"Triton model name {model_name!r}: use letters, digits, "
                             "'_', '.' and '-'")
  if int(max_batch_size) < 1:
    raise errors.ConfigError(f"Triton max_batch_size={max_batch_size}: must be >= 1 "
                             "(the batch dimension is dynamic)")
  for name, value in (("cpu_instances", cpu_instances),
                      ("intra_op_threads", intra_op_threads)):
    if int(value) < 0:
      raise errors.ConfigError(f"Triton {name}={value}: must be >= 0 (0: the default)")
  text, declared = config_text(signature, model_name=model_name,
                               max_batch_size=max_batch_size,
                               cpu_instances=cpu_instances,
                               intra_op_threads=intra_op_threads)
  model = onnx.load(onnx_path)
  used = {name for node in model.graph.node for name in node.input}
  for value in list(model.graph.input):
    if value.name not in declared:
      if value.name in used:
        raise RuntimeError(f"the ONNX graph reads {value.name}, which has a zero-size "
                           "dim and cannot be declared to Triton")
      model.graph.input.remove(value)
  model_dir = os.path.join(directory, REPOSITORY_DIR, model_name)
  os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
  for name, data in ((os.path.join("1", MODEL_FILE), model.SerializeToString()),
                     (CONFIG_FILE, text.encode())):
    path = os.path.join(model_dir, name)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  return {"repository": REPOSITORY_DIR, "model": model_name,
          "config": os.path.join(REPOSITORY_DIR, model_name, CONFIG_FILE),
          "model_file": os.path.join(REPOSITORY_DIR, model_name, "1", MODEL_FILE),
          "max_batch_size": int(max_batch_size), "inputs": declared,
          "dynamic_batching": {"max_queue_delay_microseconds": DEFAULT_QUEUE_DELAY_US},
          "cpu_instances": int(cpu_instances),
          "intra_op_threads": int(intra_op_threads)}
