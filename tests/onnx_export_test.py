"""The ONNX reranker and its Triton repository, checked against the in-process scores.

ONNX Runtime is the reference: a fresh process that never imports JAX loads each
backbone's ``reranker.onnx`` and scores lists of 1, 7 and 64; its logits must match
``serving.Scorer``'s within ``ATOL`` absolute (the max difference is printed, run
with ``-s`` to see it) and rank every list the same, but for exact ties. The models
are random-but-fixed parameters (``create_state``-style init, then perturbed so no
parameter sits at its zero init, PIER's offset biases included), with user and item
features, so every input reaches the graph. Skipped without the ``serve`` extra.
"""

import functools
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import models
from dnr_jax import serving
from dnr_jax.serving import export as export_lib
from dnr_jax.serving import onnx_export
from dnr_jax.serving import triton_repository

pytest.importorskip("jax2onnx")
ort = pytest.importorskip("onnxruntime")

N, H = 8, 6
BATCHES = (1, 7, 64)
# ONNX Runtime vs JAX, float32 both: a few ulps of the logits (measured <= 2e-6).
ATOL = 1e-4
# Logits this close are a tie (the rank order may then differ).
TIE = 1e-6
DEVICES = tuple(jax.devices()[:1])


def _bundle(backbone, score_usage="concat", features=True, seed=0):
  """A reranker with random-but-fixed parameters (no training: parity needs none)."""
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(
          backbone=backbone, score_usage=score_usage, num_items=40, num_users=15,
          user_feature_vocab=(3, 4) if features else (),
          item_feature_vocab=(5,) if features else (), hidden=16, num_heads=2,
          dropout=0.1),
      global_batch_size=64, eval_batch_size=64)
  example = batch_lib.ListBatch.from_arrays(serving.example_arrays(cfg, 2, N, H))
  params = models.make_reranker(cfg.model).init(jax.random.PRNGKey(seed), example,
                                                train=False)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
                                     for x, k in zip(leaves, keys)])
  return serving.Bundle(config=cfg, params=params,
                        meta={"list_size": N, "history_size": H})


def _lists(bundle, b):
  return serving.example_arrays(bundle.config, b, N, H, seed=100 + b)


def _assert_same_order(want, got, mask, where):
  """``serving.rerank`` of both logits agrees on every list, but between tied items."""
  r_want, r_got = serving.rerank(want, mask), serving.rerank(got, mask)
  for i in np.nonzero((r_want != r_got).any(-1))[0]:
    moved = np.nonzero(r_want[i] != r_got[i])[0]
    for j in moved:
      others = moved[moved != j]
      assert others.size and np.min(np.abs(want[i, others] - want[i, j])) <= TIE, (
          f"{where}, list {i}: order differs beyond ties: {r_want[i]} vs {r_got[i]}")


# A script for a fresh interpreter: numpy and onnxruntime only, as a serving host
# would have; the inputs' order and dtypes from signature.json.
_FRESH = r"""
import json, os, sys
import numpy as np
import onnxruntime as ort
cases = json.loads(sys.argv[1])
for directory, inputs, output in cases:
  sig = json.load(open(os.path.join(directory, "signature.json")))
  session = ort.InferenceSession(os.path.join(directory, sig["onnx"]["file"]),
                                 providers=["CPUExecutionProvider"])
  arrays = np.load(inputs)
  feed = {i["name"]: np.asarray(arrays[i["name"]], i["dtype"]) for i in sig["inputs"]}
  np.save(output, session.run([sig["output"]["name"]], feed)[0])
assert "jax" not in sys.modules and "jaxlib" not in sys.modules, "jax was imported"
print("OK")
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """Each backbone (c score) exported as jax, onnx and triton; its in-process scores."""
  root = tmp_path_factory.mktemp("onnx")
  out = {}
  for backbone in config_lib.BACKBONES:
    bundle = _bundle(backbone)
    directory = str(root / backbone)
    signature = serving.export_reranker(bundle, directory,
                                        formats=("jax", "onnx", "triton"))
    scorer = serving.Scorer(bundle, devices=DEVICES)
    lists = {b: _lists(bundle, b) for b in BATCHES}
    out[backbone] = dict(bundle=bundle, directory=directory, signature=signature,
                         lists=lists, scores={b: scorer.score(a)[0]
                                              for b, a in lists.items()})
  return out


def test_onnx_runtime_without_jax_gives_the_in_process_scores(exports, tmp_path):
  cases = []
  for backbone, e in exports.items():
    for b, arrays in e["lists"].items():
      np.savez(tmp_path / f"{backbone}_{b}_in.npz", **arrays)
      cases.append((e["directory"], str(tmp_path / f"{backbone}_{b}_in.npz"),
                    str(tmp_path / f"{backbone}_{b}_out.npy")))
  run = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(cases)],
                       capture_output=True, text=True, timeout=300,
                       check=False, cwd=str(tmp_path))
  assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
  report = {}
  for backbone, e in exports.items():
    for b, arrays in e["lists"].items():
      got = np.load(tmp_path / f"{backbone}_{b}_out.npy")
      want = e["scores"][b]
      assert got.shape == want.shape == (b, N) and got.dtype == np.float32
      diff = float(np.abs(got - want).max())
      report[f"{backbone} b={b}"] = diff
      assert diff <= ATOL, f"{backbone}, batch {b}: max |ONNX - JAX| = {diff:.3g}"
      _assert_same_order(want, got, arrays["mask"], f"{backbone}, batch {b}")
  print("\nmax |ONNX Runtime - serving.Scorer| per backbone and batch:")
  for k, v in report.items():
    print(f"  {k}: {v:.2e}")


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
def test_every_score_usage_exports_and_matches(backbone, tmp_path):
  for usage in config_lib.SCORE_USAGES:
    if usage == "concat":
      continue                    # the fresh-process test above covers it
    bundle = _bundle(backbone, usage, seed=3)
    path = str(tmp_path / f"{usage}.onnx")
    info = onnx_export.export_onnx(bundle, path, inputs=export_lib.EXPORT_INPUTS,
                                   list_size=N, history_size=H)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    arrays = _lists(bundle, 7)
    got = session.run(["logits"], {k: arrays[k] for k in info["inputs"]})[0]
    module = models.make_reranker(bundle.config.model)
    params = jax.tree.map(jax.numpy.asarray, bundle.params)
    apply = jax.jit(functools.partial(module.apply, {"params": params}, train=False))
    want = np.asarray(apply(batch_lib.ListBatch.from_arrays(arrays)))
    diff = float(np.abs(got - want).max())
    assert diff <= ATOL, f"{backbone}/{usage}: max |ONNX - JAX| = {diff:.3g}"
    _assert_same_order(want, got, arrays["mask"], f"{backbone}/{usage}")


def test_the_traced_graph_on_request_scores_as_the_simplified_one(exports, tmp_path):
  """``simplify=False`` keeps jax2onnx's graph (the baseline the simplification is
  timed against): Einsums and shape arithmetic, and the same logits."""
  import onnx  # pylint: disable=g-import-not-at-top
  e = exports["setrank"]
  path = str(tmp_path / "traced.onnx")
  info = onnx_export.export_onnx(e["bundle"], path, inputs=export_lib.EXPORT_INPUTS,
                                 list_size=N, history_size=H, simplify=False)
  ops = [n.op_type for n in onnx.load(path).graph.node]
  assert info["graph"]["nodes"] == info["graph"]["traced_nodes"] == len(ops)
  assert len(ops) > e["signature"]["onnx"]["graph"]["nodes"]
  assert "Einsum" in ops and "Shape" in ops and "LayerNormalization" not in ops
  arrays = e["lists"][7]
  feed = {k: arrays[k] for k in info["inputs"]}
  traced = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  simplified = ort.InferenceSession(
      os.path.join(e["directory"], onnx_export.ONNX_FILE),
      providers=["CPUExecutionProvider"])
  got, want = (s.run(["logits"], feed)[0] for s in (traced, simplified))
  assert np.abs(got - want).max() <= ATOL


def test_signature_and_vocabulary_are_the_jax_artifacts(exports, tmp_path):
  e = exports["prm"]
  sig = e["signature"]
  assert sig["formats"] == ["jax", "onnx", "triton"]
  assert sig["file"] == serving.EXPORT_FILE and "cpu" in sig["platforms"]
  assert sig["onnx"]["inputs"] == [i["name"] for i in sig["inputs"]]
  assert sig["onnx"]["check"]["max_abs_diff"] <= ATOL
  assert sig["onnx"]["opset"] == onnx_export.OPSET and sig["onnx"]["ir_version"] == 10
  # The symbolic batch dimension, on every input and the output.
  import onnx  # pylint: disable=g-import-not-at-top
  model = onnx.load(os.path.join(e["directory"], onnx_export.ONNX_FILE))
  for value, spec in zip(model.graph.input, sig["inputs"]):
    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert dims == spec["shape"], (value.name, dims)
  assert [d.dim_param or d.dim_value for d in
          model.graph.output[0].type.tensor_type.shape.dim] == ["b", N]
  # Every backbone's graph simplified (serving/onnx_graph.py): layer norms as one
  # operator, attention's Einsums as MatMuls, about half the traced nodes left.
  for backbone, other in exports.items():
    graph = other["signature"]["onnx"]["graph"]
    ops = [n.op_type for n in onnx.load(os.path.join(
        other["directory"], onnx_export.ONNX_FILE)).graph.node]
    assert graph["nodes"] == len(ops) < 0.75 * graph["traced_nodes"], backbone
    assert "LayerNormalization" in ops and "Einsum" not in ops, backbone
    assert graph["einsums_rewritten"] >= 2 and ops.count("Shape") <= 2, backbone
  # An ONNX-only export of a bundle with a vocabulary: the same signature inputs,
  # the vocabulary copied, no jax artifact.
  vocab = tmp_path / "vocab"
  vocab.mkdir()
  (vocab / "items.json").write_text('["a", "b"]')
  bundle = serving.Bundle(config=e["bundle"].config, params=e["bundle"].params,
                          meta=e["bundle"].meta, vocabulary_dir=str(vocab))
  directory = tmp_path / "onnx_only"
  only = serving.export_reranker(bundle, str(directory), formats="onnx")
  assert only["file"] is None and only["platforms"] == [] and "triton" not in only
  assert only["inputs"] == sig["inputs"] and only["output"] == sig["output"]
  assert not (directory / serving.EXPORT_FILE).exists()
  assert (directory / onnx_export.ONNX_FILE).exists()
  assert (directory / "vocabulary" / "items.json").read_text() == '["a", "b"]'
  assert json.loads((directory / serving.SIGNATURE_FILE).read_text())["vocabulary"] \
      == "vocabulary"


def test_unknown_format_and_missing_extra_are_one_line_errors(exports, tmp_path,
                                                             monkeypatch):
  bundle = exports["prm"]["bundle"]
  assert serving.check_formats("jax, onnx,jax") == ("jax", "onnx")
  with pytest.raises(errors.ConfigError, match="choose from"):
    serving.export_reranker(bundle, str(tmp_path / "x"), formats=("jax", "tflite"))
  monkeypatch.setitem(sys.modules, "jax2onnx", None)     # import jax2onnx fails
  for formats in ("onnx", "jax,triton"):
    with pytest.raises(errors.ConfigError, match=r'pip install -e "\.\[serve\]"'):
      serving.check_formats(formats)
    with pytest.raises(errors.ConfigError, match="serve extra"):
      serving.export_reranker(bundle, str(tmp_path / "y"), formats=formats)
  assert not (tmp_path / "y").exists()          # nothing written, not even jax
  assert serving.check_formats(["jax"]) == ("jax",)


def _parse_config(path):
  model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    return text_format.Parse(f.read(), model_config_pb2.ModelConfig()), model_config_pb2


def test_triton_config_follows_the_model_configuration_schema(exports):
  for backbone, e in exports.items():
    sig, directory = e["signature"], e["directory"]
    model_dir = os.path.join(directory, "triton", "dnr_reranker")
    assert sig["triton"]["config"] == "triton/dnr_reranker/config.pbtxt"
    config, pb2 = _parse_config(os.path.join(model_dir, "config.pbtxt"))
    assert config.name == "dnr_reranker" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == triton_repository.DEFAULT_MAX_BATCH_SIZE > 0
    assert config.HasField("dynamic_batching")
    # By default Triton and ONNX Runtime choose the instances and threads.
    assert not config.instance_group and not config.parameters
    assert sig["triton"]["cpu_instances"] == sig["triton"]["intra_op_threads"] == 0
    types = {"int32": pb2.TYPE_INT32, "bool": pb2.TYPE_BOOL, "float32": pb2.TYPE_FP32}
    assert [i.name for i in config.input] == [i["name"] for i in sig["inputs"]]
    for declared, spec in zip(config.input, sig["inputs"]):
      assert declared.data_type == types[spec["dtype"]], spec["name"]
      per_list = spec["shape"][1:]           # without the batch: Triton's dims
      if per_list:
        assert list(declared.dims) == per_list and not declared.HasField("reshape")
      else:                                  # user: [b] -> dims [1], reshaped away
        assert list(declared.dims) == [1] and list(declared.reshape.shape) == []
      assert all(d >= 1 for d in declared.dims)    # Triton rejects 0 and, here, -1
    (output,) = config.output
    assert output.name == "logits" and output.data_type == pb2.TYPE_FP32
    assert list(output.dims) == [N]
    # The repository's model is the ONNX model: same inputs, same scores.
    session = ort.InferenceSession(os.path.join(model_dir, "1", "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in config.input]
    arrays = e["lists"][7]
    got = session.run(["logits"], {i.name: arrays[i.name] for i in config.input})[0]
    assert np.abs(got - e["scores"][7]).max() <= ATOL, backbone


_TRITON_TYPES = {"int32": "INT32", "bool": "BOOL", "float32": "FP32"}


def _triton_infer(url, arrays, names):
  """Triton's HTTP inference protocol (KServe v2, JSON): ``arrays`` as the inputs
  ``names``, a ``[b]`` input sent as ``[b, 1]`` (its declared dims); the output."""
  import urllib.request  # pylint: disable=g-import-not-at-top
  b = len(arrays[names[0]])
  inputs = [{"name": n, "datatype": _TRITON_TYPES[str(arrays[n].dtype)],
             "shape": list(arrays[n].shape) if arrays[n].ndim > 1 else [b, 1],
             "data": arrays[n].reshape(-1).tolist()} for n in names]
  req = urllib.request.Request(url, data=json.dumps({"inputs": inputs}).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=30) as r:
    (out,) = json.loads(r.read())["outputs"]
  return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _triton_wheel():
  """The unpacked nvidia-pytriton wheel that brings Triton here (pip downloads it)."""
  from benchmarks import triton_server  # pylint: disable=g-import-not-at-top
  try:
    return triton_server.unpacked_wheel(triton_server.DEFAULT_DIR)
  except RuntimeError as e:
    pytest.skip(str(e))


def _repository_models(exports, edit=lambda config: config, files=None):
  """Each backbone's exported model for one Triton repository: its ``config.pbtxt``
  named after the backbone (one repository serves them all), then ``edit``ed; its
  ``model.onnx`` and ``files``."""
  models = {}
  for backbone, e in exports.items():
    model_dir = os.path.join(e["directory"], "triton", "dnr_reranker")
    with open(os.path.join(model_dir, "config.pbtxt")) as f:
      config = f.read()
    assert 'name: "dnr_reranker"' in config
    models[backbone] = (
        edit(config.replace('name: "dnr_reranker"', f'name: "{backbone}"')),
        {"model.onnx": os.path.join(model_dir, "1", "model.onnx"), **(files or {})})
  return models


def _serve_and_check(exports, work, wheel, cwd):
  """Starts Triton on the repository under ``work`` and checks every backbone: the
  in-process scores at batch sizes 1, 7 and 64, and the same from 64 single lists
  sent at once (batched by Triton's dynamic batcher)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  from benchmarks import http_load  # pylint: disable=g-import-not-at-top
  from benchmarks import process_cpu  # pylint: disable=g-import-not-at-top
  from benchmarks import triton_server  # pylint: disable=g-import-not-at-top
  port = http_load.free_port()
  proc = triton_server.start(str(work), wheel, port, cwd)
  try:
    deadline = time.time() + 120
    while True:
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
        break
      except OSError:
        assert proc.poll() is None and time.time() < deadline, (
            (work / "log").read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    for backbone, e in exports.items():
      url = f"http://127.0.0.1:{port}/v2/models/{backbone}/infer"
      names = e["signature"]["triton"]["inputs"]
      for b in BATCHES:
        got = _triton_infer(url, e["lists"][b], names)
        assert got.shape == (b, N)
        assert np.abs(got - e["scores"][b]).max() <= ATOL, (backbone, b)
      lists = e["lists"][64]
      with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i, lists=lists, url=url, names=names: _triton_infer(
            url, {k: v[i:i + 1] for k, v in lists.items()}, names), range(64)))
      assert np.abs(np.concatenate(got) - e["scores"][64]).max() <= ATOL, backbone
  finally:
    process_cpu.end_sessions([proc])


def test_triton_onnxruntime_backend_serves_the_repository_as_exported(exports,
                                                                     tmp_path):
  """The repositories of every backbone, as exported (``platform:
  "onnxruntime_onnx"``), in a real Triton server (2.51) with its ONNX Runtime
  backend, give the in-process scores. Triton checks each request against the
  config's inputs (types, dims, the ``user`` reshape) and applies them. The backend
  is built from source (``benchmarks.triton_onnxruntime_backend``; skipped where
  its sources or tools cannot be had)."""
  from benchmarks import triton_onnxruntime_backend  # pylint: disable=g-import-not-at-top
  from benchmarks import triton_server  # pylint: disable=g-import-not-at-top
  wheel = _triton_wheel()
  try:   # a build that fails (BuildError) fails the test
    backend = triton_onnxruntime_backend.built()
  except triton_onnxruntime_backend.Unavailable as e:
    pytest.skip(f"Triton's ONNX Runtime backend: {e}")
  models = _repository_models(exports)
  for config, _ in models.values():
    assert 'platform: "onnxruntime_onnx"' in config
  # One backbone as exported with pinned CPU instances and threads: Triton takes
  # those lines too (two instances, one ONNX Runtime thread each).
  e = exports["prm"]
  pinned, _ = triton_repository.config_text(
      e["signature"], model_name="prm", max_batch_size=64, cpu_instances=2,
      intra_op_threads=1)
  models["prm"] = (pinned, models["prm"][1])
  triton_server.layout(str(tmp_path), wheel, models, python_backend=False)
  triton_onnxruntime_backend.install(str(tmp_path), wheel, backend)
  _serve_and_check(exports, tmp_path, wheel, str(tmp_path))


def test_triton_serves_the_repository_in_the_python_backend(exports, tmp_path):
  """The same, with the graph run in ONNX Runtime by a Python-backend model,
  ``tests/triton_onnx_model.py`` (where the ONNX Runtime backend cannot be built,
  this still checks the config against a real Triton): only the config's platform
  line is changed."""
  here = os.path.dirname(os.path.abspath(__file__))
  wheel = _triton_wheel()
  from benchmarks import triton_server  # pylint: disable=g-import-not-at-top
  models = _repository_models(
      exports, lambda c: c.replace('platform: "onnxruntime_onnx"', 'backend: "python"'),
      {"model.py": os.path.join(here, "triton_onnx_model.py")})
  for config, _ in models.values():
    assert 'backend: "python"' in config and "onnxruntime_onnx" not in config
  triton_server.layout(str(tmp_path), wheel, models)
  _serve_and_check(exports, tmp_path, wheel, here)


def test_triton_repository_of_a_model_without_features(tmp_path):
  bundle = _bundle("prm", features=False)
  sig = serving.export_reranker(bundle, str(tmp_path), formats="triton",
                                triton_model_name="prm_plain",
                                triton_max_batch_size=16, triton_cpu_instances=2,
                                triton_intra_op_threads=1)
  assert sig["formats"] == ["triton"] and sig["file"] is None
  assert sig["triton"]["cpu_instances"] == 2 and sig["triton"]["intra_op_threads"] == 1
  assert (tmp_path / onnx_export.ONNX_FILE).exists()       # triton implies onnx
  model_dir = tmp_path / "triton" / "prm_plain"
  config, pb2 = _parse_config(str(model_dir / "config.pbtxt"))
  assert config.max_batch_size == 16
  (group,) = config.instance_group
  assert group.count == 2 and group.kind == pb2.ModelInstanceGroup.KIND_CPU
  assert config.parameters["intra_op_thread_count"].string_value == "1"
  # [b, 0] feature inputs cannot be declared to Triton (dims >= 1): left out of the
  # config and of the repository's graph, which never reads them.
  names = [i.name for i in config.input]
  assert names == ["user", "history", "history_mask", "items", "scores", "mask"]
  session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"),
                                 providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == names
  arrays = _lists(bundle, 7)
  got = session.run(["logits"], {k: arrays[k] for k in names})[0]
  want = serving.score_lists(bundle, arrays, devices=DEVICES)
  assert np.abs(got - want).max() <= ATOL
  # The top-level reranker.onnx keeps the signature's inputs, zero-size ones too.
  full = ort.InferenceSession(str(tmp_path / onnx_export.ONNX_FILE),
                              providers=["CPUExecutionProvider"])
  assert [i.name for i in full.get_inputs()] == [i["name"] for i in sig["inputs"]]
  with pytest.raises(errors.ConfigError, match="Triton model name"):
    serving.export_reranker(bundle, str(tmp_path / "bad"), formats="triton",
                            triton_model_name="../escape")
  with pytest.raises(errors.ConfigError, match="intra_op_threads=-1: must be >= 0"):
    serving.export_reranker(bundle, str(tmp_path / "bad"), formats="triton",
                            triton_intra_op_threads=-1)


def _doc_example():
  """The ONNX Runtime code block of docs/own_lists.md ("ONNX and Triton")."""
  path = os.path.join(os.path.dirname(__file__), "..", "docs", "own_lists.md")
  with open(path) as f:
    text = f.read()
  after = text[text.index("<!-- tests/onnx_export_test.py runs the next code block"):]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("features", [True, False])
def test_the_documented_onnx_runtime_example_runs_without_jax(exports, tmp_path,
                                                             features):
  if features:
    bundle, directory = exports["pier"]["bundle"], exports["pier"]["directory"]
  else:
    bundle, directory = _bundle("dlcm", features=False), str(tmp_path / "plain")
    serving.export_reranker(bundle, directory, formats="onnx")
  code = _doc_example()
  assert 'd = "/tmp/dnr_exported"' in code and "import jax" not in code
  code = code.replace('"/tmp/dnr_exported"', repr(directory)) + (
      f"\nnp.savez({str(tmp_path / 'doc.npz')!r}, logits=logits, **feed)"
      "\nimport sys\nassert 'jax' not in sys.modules, 'jax was imported'\n")
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, check=False, cwd=str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.startswith(f"(2, {N})")
  out = dict(np.load(tmp_path / "doc.npz"))
  logits = out.pop("logits")
  out["labels"] = np.zeros_like(out["scores"])
  want = serving.score_lists(bundle, out, devices=DEVICES)
  assert np.abs(logits - want).max() <= ATOL


def test_an_export_leaves_jax_and_flax_as_they_were(exports):
  # jax2onnx 0.17 leaves patches behind after a conversion (jnp.cumsum wrapped so
  # that a positional axis raises; a __call__ on flax's MultiHeadAttention);
  # export_onnx undoes them, or every later scoring in the process would break.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  assert exports
  assert jax.numpy.cumsum.__module__.startswith("jax.")
  np.testing.assert_array_equal(jax.numpy.cumsum(jax.numpy.ones(3), -1), [1, 2, 3])
  assert "__call__" not in vars(nn.MultiHeadAttention)
  assert "__call__" not in vars(nn.Conv)
