"""The traced ONNX graph, made cheaper to run without changing what it computes.

jax2onnx keeps the batch dimension symbolic by computing every ``Reshape`` and
``Expand`` target at run time (``Shape``, ``Gather``, ``Slice``, ``Concat`` of the
input's dimensions), and writes attention's contractions as ``Einsum``. ONNX
Runtime runs every one of those nodes on every call, and its ``Einsum`` kernel
costs more than the ``Transpose`` and ``MatMul`` it stands for. ``simplify``:

1. folds the shape arithmetic and removes what no longer feeds the output
   (onnxscript's optimizer: constant folding on the static dimensions, a
   ``Reshape`` target with ``-1`` for the batch, dead-node removal; then its
   default rewrite rules, among them the removal of no-op ``Expand``, ``Reshape``
   and ``Cast``: each an identity of ONNX's operators);
2. rewrites each two-operand ``Einsum`` that is a batched matrix product (one
   free index per operand, one contracted) as ``Transpose``, ``MatMul`` and
   ``Transpose`` (``einsum_to_matmul``); other equations are left as they are.

Each step is exact algebra on the same float32 kernels: the logits agree with the
traced graph's within float rounding (``tests/onnx_graph_test.py``), and the export
checks them against JAX as before. Needs the ``serve`` extra (onnxscript).
"""

from __future__ import annotations

from typing import Optional


def _letters(term: str, rank: int) -> Optional[list[str]]:
  """``"...qhd"`` at ``rank`` 4 as ``["...0", "q", "h", "d"]``; None if malformed."""
  if term.count("...") > 1 or "." in term.replace("...", ""):
    return None
  head, _, tail = term.partition("...")
  if "..." not in term:
    return list(term) if len(term) == rank else None
  fill = rank - len(head) - len(tail)
  if fill < 0:
    return None
  return list(head) + [f"...{i}" for i in range(fill)] + list(tail)


def matmul_plan(equation: str, rank: int):
  """How ``Einsum(equation)`` of two rank-``rank`` operands is a batched ``MatMul``.

  Returns:
    ``(perm_a, perm_b, perm_out)``: ``MatMul(Transpose(a, perm_a),
    Transpose(b, perm_b))`` transposed by ``perm_out`` equals the einsum; None when
    the equation is not one free index per operand and one contracted index over
    batch indices both operands and the output share (the rest stays ``Einsum``).
  """
  if equation.count("->") != 1 or equation.count(",") != 1:
    return None
  lhs, out_term = equation.replace(" ", "").split("->")
  a_term, b_term = lhs.split(",")
  a, b = _letters(a_term, rank), _letters(b_term, rank)
  if a is None or b is None:
    return None
  # A batched product keeps the rank. Einsum aligns ellipsis dimensions from the
  # right and broadcasts them, so "...0" names the same dimension in all three
  # terms only where the three ellipses are equally wide: others stay Einsum.
  out = _letters(out_term, rank)
  if out is None or any(len(set(t)) != len(t) for t in (a, b, out)):
    return None
  widths = {sum(x.startswith("...") for x in t) for t in (a, b, out)}
  if len(widths) != 1:
    return None
  batch = [x for x in out if x in a and x in b]
  contracted = [x for x in a if x in b and x not in out]
  free_a = [x for x in a if x not in b]
  free_b = [x for x in b if x not in a]
  if (len(contracted) != 1 or len(free_a) != 1 or len(free_b) != 1
      or sorted(out) != sorted(batch + free_a + free_b)
      or len(batch) != rank - 2):
    return None
  perm_a = [a.index(x) for x in batch + free_a + contracted]
  perm_b = [b.index(x) for x in batch + contracted + free_b]
  product = batch + free_a + free_b
  perm_out = [product.index(x) for x in out]
  return perm_a, perm_b, perm_out


def einsum_to_matmul(model) -> int:
  """Rewrites, in place, each ``Einsum`` of ``model`` (an ``onnx_ir.Model``) that
  ``matmul_plan`` can plan; returns how many."""
  import onnx_ir as ir  # pylint: disable=g-import-not-at-top
  graph = model.graph
  rewritten = 0
  for node in list(graph):
    if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(
        node.inputs) != 2:
      continue
    x, y = node.inputs
    if x is None or y is None or x.shape is None or y.shape is None or (
        x.shape.rank() != y.shape.rank()) or x.shape.rank() < 2:
      continue
    plan = matmul_plan(node.attributes["equation"].value, x.shape.rank())
    if plan is None:
      continue
    identity = list(range(x.shape.rank()))

    def add(op, inputs, attributes=None, _at=node):
      new = ir.node(op, inputs, attributes=attributes or {})
      graph.insert_before(_at, new)
      return new.outputs[0]

    perm_a, perm_b, perm_out = plan
    if perm_a != identity:
      x = add("Transpose", [x], {"perm": perm_a})
    if perm_b != identity:
      y = add("Transpose", [y], {"perm": perm_b})
    result = add("MatMul", [x, y])
    if perm_out != identity:
      result = add("Transpose", [result], {"perm": perm_out})
    old = node.outputs[0]
    result.shape, result.type = old.shape, old.type
    if old.is_graph_output():
      result.name, old.name = old.name, f"{old.name}_einsum"
      graph.outputs[graph.outputs.index(old)] = result
    old.replace_all_uses_with(result)
    graph.remove(node, safe=True)
    rewritten += 1
  return rewritten


def simplify(model_proto):
  """``model_proto`` (an ``onnx.ModelProto``) simplified as the module says (the
  serve extra's onnxscript: ``onnx_export.require_serve_extra`` checks for it).

  Returns:
    ``(simplified ModelProto, {"traced_nodes": .., "nodes": .., "einsums_rewritten":
    ..})``; ``traced_nodes`` counts the graph as given (jax2onnx's, with its
    one-node layer norms).
  """
  import onnx_ir as ir  # pylint: disable=g-import-not-at-top
  import onnxscript.optimizer  # pylint: disable=g-import-not-at-top
  from onnxscript import rewriter  # pylint: disable=g-import-not-at-top
  traced = len(model_proto.graph.node)
  model = ir.from_proto(model_proto)
  onnxscript.optimizer.optimize(model)
  model = rewriter.rewrite(model)
  rewritten = einsum_to_matmul(model)
  onnxscript.optimizer.optimize(model)
  proto = ir.to_proto(model)
  return proto, {"traced_nodes": traced, "nodes": len(proto.graph.node),
                 "einsums_rewritten": rewritten}
