"""Triton Inference Server for the serving benchmarks: the server, a model
repository with a Python-backend model, and requests in its binary extension.

The server comes from the nvidia-pytriton 0.6.0 wheel
(``dnr_jax.serving.triton.server``), which also carries the Python backend and a
backend stub for each Python version, 3.11 among them (0.7.0 has none for 3.11).
``unpacked_wheel`` checks for this Python's stub; ``layout`` copies the backend with
it and writes a model; ``start`` runs the server on localhost.

A request to a Python-backend model carries one body (the service's JSON) as
``dnr_jax.serving.triton.client`` sends it to the raw-ids model: the UINT8 tensor
``request`` in Triton's binary tensor extension; the reply's ``reply`` tensor comes
back the same way. A request to
an exported model (``tensor_bodies``) carries one list's arrays as its inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Optional

import numpy as np

from dnr_jax.serving.triton import client
from dnr_jax.serving.triton import server as server_lib

HEADER_BYTES = client.HEADER_BYTES
HEADERS = client.HEADERS
DEFAULT_DIR = server_lib.DEFAULT_DIR
request_body = client.request_body
_SERVER = server_lib.SERVER
_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def unpacked_wheel(directory: str) -> str:
  """``server_lib.unpacked_wheel``, checked for a Python-backend stub for this
  Python.

  Raises:
    RuntimeError: the wheel could not be downloaded, or has no stub for this Python.
  """
  server_lib.unpacked_wheel(directory)
  if not os.path.exists(os.path.join(directory, *_SERVER, "python_backend_stubs",
                                     _PYTHON, "triton_python_backend_stub")):
    raise RuntimeError(f"{server_lib.WHEEL} has no Python-backend stub for Python "
                       f"{_PYTHON}")
  return directory


def layout(work: str, wheel: str, models: dict[str, tuple[str, dict[str, str]]], *,
           python_backend: bool = True) -> None:
  """Under ``work``: ``repo/``, with ``repo/<name>`` for each of ``models``, name ->
  ``(config, files)``: ``config.pbtxt`` = ``config``, and version ``1`` holding
  ``files`` (name in the folder -> source path). With ``python_backend``, also
  ``backends/python`` (the wheel's Python backend with this Python's stub), and
  ``benchmarks/triton_tensors.py`` beside each model's files (its ``model.py``)."""
  os.makedirs(os.path.join(work, "backends"), exist_ok=True)
  extra = {}
  if python_backend:
    server = os.path.join(wheel, *_SERVER)
    backend = os.path.join(work, "backends", "python")
    shutil.copytree(os.path.join(server, "backends", "python"), backend)
    shutil.copy2(os.path.join(server, "python_backend_stubs", _PYTHON,
                              "triton_python_backend_stub"), backend)
    extra["triton_tensors.py"] = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "triton_tensors.py")
  for model, (config, files) in models.items():
    version = os.path.join(work, "repo", model, "1")
    os.makedirs(version)
    for name, source in {**files, **extra}.items():
      shutil.copy2(source, os.path.join(version, name))
    with open(os.path.join(work, "repo", model, "config.pbtxt"), "w") as f:
      f.write(config)


def start(work: str, wheel: str, port: int, cwd: str) -> subprocess.Popen:
  """``tritonserver`` on ``port`` (HTTP only) for ``layout``'s ``work``, in a
  session of its own; its log in ``work/log``."""
  with open(os.path.join(work, "log"), "wb") as log:
    return subprocess.Popen(server_lib.command(work, wheel, port=port), cwd=cwd,
                            env=server_lib.environment(wheel),
                            stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True)


def bytes_model_config(name: str, *, max_batch_size: int, queue_delay_us: int,
                       instances: int = 1, parameters: Optional[dict] = None) -> str:
  """``config.pbtxt`` of a Python-backend model that takes one body per request
  (``request``, UINT8, ragged) and answers one (``reply``), with dynamic batching;
  ``parameters`` (name -> string) reach the model's ``initialize``."""
  lines = [
      f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
      'input [ { name: "request" data_type: TYPE_UINT8 dims: [ -1 ] '
      'allow_ragged_batch: true } ]',
      'output [ { name: "reply" data_type: TYPE_UINT8 dims: [ -1 ] } ]',
      f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
      f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]"]
  lines += [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
            for k, v in (parameters or {}).items()]
  return "\n".join(lines) + "\n"


_DATATYPES = {"int32": "INT32", "int64": "INT64", "float32": "FP32", "bool": "BOOL"}


def tensor_bodies(arrays: dict, names: list[str], output: str
                  ) -> tuple[list[bytes], dict[str, str]]:
  """One binary-extension request per list of ``arrays`` (``[N, ...]`` each): the
  inputs ``names`` in that order (a ``[N]`` array as ``[1, 1]``, booleans as one
  byte each), asking for ``output`` in binary. Every list has the same shapes, so
  one header (and one set of request headers, returned) serves every body."""
  one = {}
  for name in names:
    a = np.asarray(arrays[name])
    one[name] = (a.reshape(-1, 1) if a.ndim == 1 else a,
                 np.uint8 if a.dtype == bool else a.dtype)
  header = json.dumps({"inputs": [
      {"name": name, "shape": [1, *a.shape[1:]],
       "datatype": _DATATYPES[str(a.dtype)],
       "parameters": {"binary_data_size": int(np.prod(a.shape[1:])) *
                                          np.dtype(wire).itemsize}}
      for name, (a, wire) in one.items()],
      "outputs": [{"name": output, "parameters": {"binary_data": True}}]}).encode()
  bodies = [header + b"".join(np.ascontiguousarray(a[i], wire).tobytes()
                              for a, wire in one.values())
            for i in range(len(arrays[names[0]]))]
  return bodies, {"Inference-Header-Content-Length": str(len(header)),
                  "Content-Type": "application/octet-stream"}


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
  """POSTs ``request_body(body)``: the status, and the reply tensor's bytes (the
  error's JSON for a status other than 200; 0 and nothing if the server is not
  answering)."""
  return post_request(url, request_body(body), HEADERS, timeout)


def post_request(url: str, data: bytes, headers: dict, timeout: float = 10.0
                 ) -> tuple[int, bytes]:
  """POSTs a whole binary-extension request (``data`` and its ``headers``, as
  ``tensor_bodies`` gives them): the status, and the bytes after the reply's
  header (one binary output: its tensor), as ``post``."""
  req = urllib.request.Request(url, data=data, headers=headers)
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      data, n = r.read(), r.headers.get("Inference-Header-Content-Length")
      return r.status, data[int(n):] if n else data
  except urllib.error.HTTPError as e:
    return e.code, e.read()
  except OSError:
    return 0, b""
