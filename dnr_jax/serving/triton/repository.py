"""A Triton model repository that serves the online service's request in raw ids.

``write`` lays out, under a folder: ``repo/<name>/config.pbtxt`` (``backend:
"dnr"``: the ``request`` body in, the ``reply`` out, dynamic batching, CPU
instances), ``repo/<name>/1/`` with the ONNX reranker, the run's vocabulary and
the request limits (``limits.json``, ``requests.RequestLimits``), and
``backends/dnr`` with the built backend (``build.built``). ``tritonserver
--model-repository=<folder>/repo --backend-directory=<folder>/backends`` serves it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

MODEL = "dnr_rerank"
# How long Triton's dynamic batcher holds a request for others. With 32 clients a
# batch never fills, so every batch waits out the whole delay; a delay of about half
# a batch's scoring time keeps the instance busy without leaving it idle. Measured
# in docs/serving_triton.md ("What moved the rate"): 0.4 ms served 19% more than 1 ms.
DEFAULT_QUEUE_DELAY_US = 400


def config(name: str = MODEL, *, max_batch_size: int = 64,
           queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
           instances: int = 1, intra_op_threads: int = 1) -> str:
  """``config.pbtxt``: the service's body in (UINT8, one ragged row per request),
  its reply out, Triton's dynamic batcher (a batch waits at most
  ``queue_delay_us`` for ``max_batch_size`` lists), ``instances`` CPU instances,
  each with an ONNX Runtime session of ``intra_op_threads`` threads."""
  return "\n".join([
      f'name: "{name}"', 'backend: "dnr"', f"max_batch_size: {max_batch_size}",
      'input [ { name: "request" data_type: TYPE_UINT8 dims: [ -1 ] '
      'allow_ragged_batch: true } ]',
      'output [ { name: "reply" data_type: TYPE_UINT8 dims: [ -1 ] } ]',
      f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
      f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
      f'parameters {{ key: "intra_op_threads" value: {{ string_value: '
      f'"{intra_op_threads}" }} }}']) + "\n"


def write(folder: str, backend: str, *, onnx_file: str, vocab_file: str, limits,
          name: str = MODEL, **settings) -> str:
  """The repository and backend under ``folder`` (which must not hold a ``repo``
  yet); ``settings`` go to ``config``. Returns ``folder``.

  Args:
    backend: ``build.built``'s folder.
    onnx_file: the reranker's ONNX model (``export_reranker(formats=("onnx",))``).
    vocab_file: the run's ``vocab.json`` (``Vocabulary.save``).
    limits: ``requests.RequestLimits``, what a request may hold.
  """
  version = os.path.join(folder, "repo", name, "1")
  os.makedirs(version)
  shutil.copy2(onnx_file, os.path.join(version, "reranker.onnx"))
  shutil.copy2(vocab_file, os.path.join(version, "vocab.json"))
  with open(os.path.join(version, "limits.json"), "w") as f:
    json.dump(dataclasses.asdict(limits), f)
  with open(os.path.join(folder, "repo", name, "config.pbtxt"), "w") as f:
    f.write(config(name, **settings))
  target = os.path.join(folder, "backends", "dnr")
  shutil.rmtree(target, ignore_errors=True)
  shutil.copytree(backend, target)
  return folder
