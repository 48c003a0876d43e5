"""Triton requests and repositories as the serving benchmarks build them (no server:
``onnx_export_test`` and the engine benchmark's test run real ones)."""

import json

import numpy as np

from benchmarks import triton_server


def _decode(body, headers):
  """A binary-extension request back into its header and named arrays."""
  width = int(headers["Inference-Header-Content-Length"])
  header = json.loads(body[:width])
  arrays, at = {}, width
  for spec in header["inputs"]:
    size = spec["parameters"]["binary_data_size"]
    dtype = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}[spec["datatype"]]
    arrays[spec["name"]] = np.frombuffer(body[at:at + size], dtype).reshape(
        spec["shape"])
    at += size
  assert at == len(body)
  return header, arrays


def test_tensor_bodies_carry_each_list_in_the_declared_order_and_layout():
  rng = np.random.default_rng(0)
  arrays = {"user": np.array([7, 12345678], np.int32),
            "items": rng.integers(0, 9, (2, 5)).astype(np.int32),
            "mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool),
            "scores": rng.random((2, 5)).astype(np.float32),
            "item_features": rng.integers(0, 3, (2, 5, 2)).astype(np.int32)}
  names = ["user", "items", "mask", "scores", "item_features"]
  bodies, headers = triton_server.tensor_bodies(arrays, names, "logits")
  assert len(bodies) == 2
  for i, body in enumerate(bodies):
    header, got = _decode(body, headers)
    assert [s["name"] for s in header["inputs"]] == names
    assert header["outputs"] == [{"name": "logits", "parameters": {"binary_data": True}}]
    assert got["user"].shape == (1, 1) and got["user"][0, 0] == arrays["user"][i]
    assert got["mask"].shape == (1, 5)
    for name in names[1:]:
      np.testing.assert_array_equal(got[name][0], arrays[name][i])
  # One header for every list: each body is that header, then the list's bytes.
  width = int(headers["Inference-Header-Content-Length"])
  assert bodies[0][:width] == bodies[1][:width]
  assert len(bodies[0]) == width + 4 + 5 * 4 + 5 + 5 * 4 + 5 * 2 * 4


def test_layout_without_the_python_backend_writes_only_the_repository(tmp_path):
  model = tmp_path / "model.onnx"
  model.write_bytes(b"onnx")
  triton_server.layout(str(tmp_path / "work"), "/nonexistent-wheel",
                       {"m": ('name: "m"\n', {"model.onnx": str(model)})},
                       python_backend=False)
  work = tmp_path / "work"
  assert sorted(p.name for p in (work / "backends").iterdir()) == []
  assert (work / "repo" / "m" / "config.pbtxt").read_text() == 'name: "m"\n'
  assert sorted(p.name for p in (work / "repo" / "m" / "1").iterdir()) == ["model.onnx"]
