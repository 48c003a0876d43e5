"""``serving.onnx_graph``: the Einsum rewrite's plans, and graphs that compute the
same after ``simplify`` (ONNX Runtime on both). The exported rerankers' parity with
JAX after simplification is ``tests/onnx_export_test.py``'s."""

import numpy as np
import pytest

from dnr_jax.serving import onnx_graph

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("equation,rank,plan", [
    # attention's two contractions, as jax2onnx writes them
    ("...qhd,...khd->...hqk", 4, ([0, 2, 1, 3], [0, 2, 3, 1], [0, 1, 2, 3])),
    ("...hqk,...khd->...qhd", 4, ([0, 1, 2, 3], [0, 2, 1, 3], [0, 2, 1, 3])),
    ("ij,jk->ik", 2, ([0, 1], [0, 1], [0, 1])),
    ("bij,bkj->bik", 3, ([0, 1, 2], [0, 2, 1], [0, 1, 2])),
    ("bij,bjk->bki", 3, ([0, 1, 2], [0, 1, 2], [0, 2, 1])),
    ("b i j , b j k -> b i k", 3, ([0, 1, 2], [0, 1, 2], [0, 1, 2])),
])
def test_batched_products_are_planned(equation, rank, plan):
  assert onnx_graph.matmul_plan(equation, rank) == plan


@pytest.mark.parametrize("equation,rank", [
    ("ij,ij->ij", 2),          # elementwise: nothing contracted
    ("i,j->ij", 1),            # outer product: rank changes
    ("bii,bij->bj", 3),        # a repeated index (a diagonal)
    ("bij,bjk->bk", 3),        # a free index summed away
    ("bijk,bjkl->bil", 4),     # two contracted indices (needs a reshape)
    ("ij,jk,kl->il", 2),       # three operands
    ("ij,jk", 2),              # implicit output
    ("i.j,jk->ik", 2),         # malformed
    ("ijk,jk->ik", 2),         # a term longer than the rank
    ("...j,...jk->...k", 3),   # ellipses of different widths (aligned from the right)
    ("...i,...k->...ik", 3),   # an output ellipsis narrower than the operands'
])
def test_other_equations_stay_einsum(equation, rank):
  assert onnx_graph.matmul_plan(equation, rank) is None


@pytest.mark.parametrize("equation,shape_a,shape_b", [
    ("...qhd,...khd->...hqk", (2, 5, 3, 4), (2, 6, 3, 4)),
    ("...hqk,...khd->...qhd", (2, 3, 5, 6), (2, 6, 3, 4)),
    ("...ij,...jk->...ik", (3, 1, 2, 4), (1, 5, 4, 6)),   # broadcast batch dims
    ("ij,...jk->ik", (2, 3), (3, 4)),                     # an empty ellipsis
    ("bij,bkj->bik", (2, 3, 4), (2, 5, 4)),
    ("bij,bjk->bki", (2, 3, 4), (2, 4, 5)),
    ("bji,bjk->bki", (2, 4, 3), (2, 4, 5)),
])
def test_every_plan_computes_the_einsum(equation, shape_a, shape_b):
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=shape_a), rng.normal(size=shape_b)
  plan = onnx_graph.matmul_plan(equation, a.ndim)
  assert plan is not None
  perm_a, perm_b, perm_out = plan
  got = np.matmul(a.transpose(perm_a), b.transpose(perm_b)).transpose(perm_out)
  np.testing.assert_allclose(got, np.einsum(equation, a, b), rtol=1e-12, atol=1e-12)


def _model(nodes, inputs, output, initializers=(), shapes=()):
  """A model of ``nodes``; ``shapes`` ``(name, dims)`` annotate values as jax2onnx
  does (from JAX's shapes, ``b`` symbolic)."""
  value = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
  graph = helper.make_graph(
      nodes, "g", [value(n, s) for n, s in inputs], [value(*output)],
      initializer=list(initializers), value_info=[value(n, s) for n, s in shapes])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
  model.ir_version = 10
  onnx.checker.check_model(model)
  return onnx.shape_inference.infer_shapes(model)


def _run(model, feed):
  session = ort.InferenceSession(model.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
  return session.run(None, feed)[0]


def test_simplified_attention_computes_the_same():
  """Attention as jax2onnx traces it (shape arithmetic for a symbolic batch,
  Einsum), an outer product that must stay Einsum, an Einsum as the graph's output:
  the same values at batch sizes 1 and 5, with no Shape, Einsum-for-a-product or
  Concat left."""
  rng = np.random.default_rng(0)
  w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8],
                         rng.normal(size=64).astype(np.float32).ravel())
  nodes = [
      # q = reshape(x @ w, [b, n, 2, 4]), the target computed from Shape(x) as
      # jax2onnx writes it
      helper.make_node("Shape", ["x"], ["sx"]),
      helper.make_node("Gather", ["sx", "zero"], ["batch"], axis=0),
      helper.make_node("Concat", ["batch", "heads"], ["qshape"], axis=0),
      helper.make_node("MatMul", ["x", "w"], ["xw"]),
      helper.make_node("Reshape", ["xw", "qshape"], ["q"]),
      helper.make_node("Reshape", ["x", "qshape"], ["k"]),
      helper.make_node("Einsum", ["q", "k"], ["logits"],
                       equation="...qhd,...khd->...hqk"),
      helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
      helper.make_node("Einsum", ["p", "k"], ["att"],
                       equation="...hqk,...khd->...qhd"),
      helper.make_node("Einsum", ["att", "att"], ["sq"],
                       equation="bqhd,bqhd->bqhd"),              # elementwise: kept
      helper.make_node("Reshape", ["sq", "flat"], ["y2"]),
      helper.make_node("Einsum", ["y2", "x"], ["y"], equation="bij,bkj->bik"),
  ]
  consts = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor("heads", TensorProto.INT64, [3], [3, 2, 4]),
            helper.make_tensor("flat", TensorProto.INT64, [3], [0, 0, 8]), w]
  model = _model(nodes, [("x", ["b", 3, 8])], ("y", ["b", 3, 3]), consts,
                 [("q", ["b", 3, 2, 4]), ("k", ["b", 3, 2, 4])])
  simplified, stats = onnx_graph.simplify(model)
  ops = [n.op_type for n in simplified.graph.node]
  assert stats == {"traced_nodes": len(nodes), "nodes": len(ops),
                   "einsums_rewritten": 3}
  assert ops.count("Einsum") == 1 and "Shape" not in ops and "Concat" not in ops
  assert [o.name for o in simplified.graph.output] == ["y"]
  assert [i.name for i in simplified.graph.input] == ["x"]
  for b in (1, 5):
    x = rng.normal(size=(b, 3, 8)).astype(np.float32)
    want, got = _run(model, {"x": x}), _run(simplified, {"x": x})
    assert got.shape == want.shape == (b, 3, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_unplannable_graph_is_left_computing_the_same():
  nodes = [helper.make_node("Einsum", ["a", "b"], ["c"], equation="bii,bij->bj")]
  model = _model(nodes, [("a", [2, 3, 3]), ("b", [2, 3, 4])], ("c", [2, 4]))
  simplified, stats = onnx_graph.simplify(model)
  assert stats["einsums_rewritten"] == 0
  assert [n.op_type for n in simplified.graph.node] == ["Einsum"]
  rng = np.random.default_rng(1)
  feed = {"a": rng.normal(size=(2, 3, 3)).astype(np.float32),
          "b": rng.normal(size=(2, 3, 4)).astype(np.float32)}
  np.testing.assert_allclose(_run(simplified, feed), _run(model, feed), rtol=1e-6)
