"""The matrix-product ceiling of a step: the most lists/s this machine could give.

Nearly all of a reranker step's FLOPs are matrix products: per token and layer, PRM
at hidden ``d`` runs four ``d x d`` projections and a ``d -> 2d -> d`` feed-forward,
three times over for the backward pass. The fastest any implementation could run the
step is its FLOPs at the rate the machine multiplies matrices of those shapes, with
everything else (layer norms, softmax, GELU, dropout, copies, the optimiser) free.

``model_gemms`` lists the model's dense shapes (``[rows, d] x [d, d]``, ``[d, 2d]``,
``[2d, d]``, ``rows`` = the lists of a step times the list length); ``jax_gemm`` and
``torch_gemm`` make runners that multiply fp32 matrices of one shape (the former
jitted, as the step's products are compiled; the latter as PyTorch eager calls its
BLAS); ``gemm_rate`` turns their timings into FLOP/s and ``ceiling`` a step's FLOPs per
list into the ceiling.
A speed target above the ceiling cannot be met on that machine by any code that
computes the same FLOPs; ``benchmarks/step.py --roofline`` prints it beside the
measured steps.

Each product is one dispatched call, so the rate is the compute rate only where a
product takes far longer than a dispatch (milliseconds at the PyTorch comparison's shapes:
batch 256 x 50 tokens, hidden 128). At toy shapes it measures dispatch, and a compiled
step, which dispatches once, can beat its "ceiling". Both libraries multiply at their
default fp32 precision, as the steps do: on CPUs full fp32; on recent NVIDIA GPUs JAX's
default may use TF32 where PyTorch's does not (the ceiling takes the faster rate).
"""

from __future__ import annotations

from typing import Callable


def model_gemms(rows: int, hidden: int) -> list[tuple[int, int, int]]:
  """The dense ``(m, k, n)`` products of one PRM token layer over ``rows`` tokens."""
  return [(rows, hidden, hidden), (rows, hidden, 2 * hidden), (rows, 2 * hidden, hidden)]


def jax_gemm(m: int, k: int, n: int, seed: int = 0) -> Callable[[int], None]:
  """``run(iters)``: ``iters`` jitted fp32 ``[m, k] x [k, n]`` products, waited for."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.PRNGKey(seed))
  a = jax.random.normal(ka, (m, k), jnp.float32)
  b = jax.random.normal(kb, (k, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))          # compile outside the timings

  def run(iters: int) -> None:
    out = None
    for _ in range(iters):
      out = matmul(a, b)
    jax.block_until_ready(out)
  return run


def torch_gemm(m: int, k: int, n: int, device: str = "cpu",
               seed: int = 0) -> Callable[[int], None]:
  """``run(iters)``: ``iters`` PyTorch fp32 ``[m, k] x [k, n]`` products, synchronised."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  a = torch.randn(m, k, generator=gen).to(device)
  b = torch.randn(k, n, generator=gen).to(device)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

  def run(iters: int) -> None:
    with torch.no_grad():
      for _ in range(iters):
        torch.mm(a, b)
    sync()
  return run


def gemm_rate(gemms: list[tuple[int, int, int]], secs: list[float]) -> float:
  """FLOP/s of the products ``gemms`` (``(m, k, n)``), one each, taking ``secs`` each.

  The FLOPs of all shapes over their summed time: the rate of one token layer's
  dense products, each shape weighted by its work.
  """
  if len(gemms) != len(secs) or not gemms or min(secs) <= 0:
    raise ValueError(f"one positive time per shape: {gemms} vs {secs}")
  return sum(2.0 * m * k * n for m, k, n in gemms) / sum(secs)


def ceiling(gemm_flops_per_s: float, flops_per_list: float) -> float:
  """Lists/s of a step of ``flops_per_list`` FLOPs if all ran at ``gemm_flops_per_s``."""
  if gemm_flops_per_s <= 0 or flops_per_list <= 0:
    raise ValueError(f"positive rates and FLOPs: {gemm_flops_per_s}, {flops_per_list}")
  return gemm_flops_per_s / flops_per_list
