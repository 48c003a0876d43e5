"""The hash-based dropout (dnr_jax/models/dropout.py): nn.Dropout's semantics, cheaper mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnr_jax.models import dropout


@pytest.mark.parametrize("keep", [0.7, 0.5, 0.1])
def test_keep_rate_and_independent_elements(keep):
  m = np.asarray(dropout.keep_mask(jax.random.PRNGKey(0), (400, 50, 64), keep))
  n = m.size
  # Binomial: 5 standard deviations.
  assert abs(m.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)
  # Neighbouring elements (consecutive indices, the hash's input) are uncorrelated.
  a, b = m.reshape(-1)[:-1].astype(float), m.reshape(-1)[1:].astype(float)
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(n)
  # Per-row keep rates vary like independent draws, not in blocks.
  rows = m.reshape(400, -1).mean(1)
  assert rows.std() < 2 * np.sqrt(keep * (1 - keep) / m[0].size)


def test_masks_of_different_keys_are_independent():
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  a = np.asarray(dropout.keep_mask(k1, (200, 500), 0.7)).astype(float).ravel()
  b = np.asarray(dropout.keep_mask(k2, (200, 500), 0.7)).astype(float).ravel()
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
  same = np.asarray(dropout.keep_mask(k1, (200, 500), 0.7)).astype(float).ravel()
  np.testing.assert_array_equal(a, same)   # deterministic in the key


def test_module_scales_kept_values_and_is_identity_when_deterministic():
  x = jnp.ones((64, 50, 16))
  layer = dropout.Dropout(0.3)
  y = np.asarray(layer.apply({}, x, rngs={"dropout": jax.random.PRNGKey(1)}))
  kept = y != 0
  np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
  assert abs(kept.mean() - 0.7) < 0.01
  # Mean preserved in expectation.
  assert abs(y.mean() - 1.0) < 0.02
  np.testing.assert_array_equal(
      dropout.Dropout(0.3, deterministic=True).apply({}, x), x)
  np.testing.assert_array_equal(dropout.Dropout(0.0).apply({}, x), x)
  np.testing.assert_array_equal(
      dropout.Dropout(1.0).apply({}, x, rngs={"dropout": jax.random.PRNGKey(1)}), 0 * x)


def test_gradient_flows_only_through_kept_elements():
  x = jnp.arange(1.0, 201.0).reshape(10, 20)
  f = lambda v: dropout.Dropout(0.5).apply(
      {}, v, rngs={"dropout": jax.random.PRNGKey(2)}).sum()
  g = np.asarray(jax.grad(f)(x))
  y = np.asarray(dropout.Dropout(0.5).apply({}, x, rngs={"dropout": jax.random.PRNGKey(2)}))
  np.testing.assert_allclose(g, np.where(y != 0, 2.0, 0.0))


def test_bfloat16_input_keeps_its_dtype():
  x = jnp.ones((8, 8), jnp.bfloat16)
  y = dropout.Dropout(0.3).apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
  assert y.dtype == jnp.bfloat16
