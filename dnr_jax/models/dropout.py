"""Dropout whose mask costs one small key draw and an integer hash per element.

``flax.linen.Dropout`` draws one threefry-2x32 number per element, millions a step
at the paper's shapes, a measurable share of a CPU step (``docs/performance.md``).
A dropout mask needs no cryptographic generator: here threefry draws two 32-bit
seeds per call, and each element's keep decision is a two-round integer hash of its
index and the seeds (Wellons' "lowbias32" finaliser, a bijection of 32-bit integers
with good avalanche). Same interface and semantics as ``nn.Dropout``: elements are kept
with probability ``1 - rate`` (to within 2**-32) and scaled by ``1 / (1 - rate)``;
new randomness for every call (``make_rng``), none when deterministic.

The masks differ from ``nn.Dropout``'s for the same key (a different generator),
which changes no expectation; tests pin the keep rate, the scaling and the
independence between calls (``tests/dropout_test.py``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _lowbias32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
  """Bernoulli(``keep_prob``) booleans of ``shape`` from ``key`` (hash-based).

  Raises:
    ValueError: more than 2**32 elements (the element index is 32-bit).
  """
  size = int(np.prod(shape))
  if size > 2**32:
    raise ValueError(f"dropout over {size} elements: at most 2**32 per call")
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  bits = _lowbias32(_lowbias32(index ^ seeds[0]) + seeds[1])
  # keep iff bits < keep_prob * 2**32 (uint32 compare; keep_prob 1 keeps all).
  threshold = min(int(round(keep_prob * 2.0**32)), 2**32 - 1)
  return bits < jnp.uint32(threshold)


class Dropout(nn.Module):
  """``nn.Dropout(rate, deterministic)`` with a hash-based mask (``keep_mask``)."""
  rate: float
  deterministic: bool = False
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    mask = keep_mask(self.make_rng(self.rng_collection), x.shape, keep_prob)
    return jnp.where(mask, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))
