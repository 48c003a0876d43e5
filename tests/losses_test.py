"""Tests of the Eq. 5 loss terms and the L_x estimators."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnr_jax import config as config_lib
from dnr_jax import losses


def test_bce_ignores_padding_and_matches_optax():
  logits = jnp.array([[2.0, -1.0, 100.0]])
  labels = jnp.array([[1.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, False]])
  want = optax.sigmoid_binary_cross_entropy(logits[:, :2], labels[:, :2]).mean()
  np.testing.assert_allclose(losses.direct_loss(logits, labels, mask), want, rtol=1e-6)
  np.testing.assert_allclose(losses.adversarial_loss(logits, labels, mask), -want, rtol=1e-6)


def _samples(seed, shift=0.0, n=(64, 20), rate=0.3):
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < rate).astype(np.float32)
  x = np.clip(0.3 + 0.4 * labels + 0.1 * rng.normal(size=n) + shift, 0, 1)
  mask = rng.random(n) < 0.9
  return jnp.asarray(x, jnp.float32), jnp.asarray(labels), jnp.asarray(mask)


@pytest.mark.parametrize("estimator", config_lib.LX_ESTIMATORS)
@pytest.mark.parametrize("per_class", [False, True])
def test_distribution_loss_zero_on_same_and_grows_with_shift(estimator, per_class):
  cfg = config_lib.LossConfig(lx_estimator=estimator, lx_per_class=per_class)
  x, z, m = _samples(0)
  same = float(losses.distribution_loss(x, x, z, m, cfg))
  near = float(losses.distribution_loss(x + 0.05, x, z, m, cfg))
  far = float(losses.distribution_loss(x + 0.3, x, z, m, cfg))
  assert abs(same) < 1e-5
  assert 0 < near < far


@pytest.mark.parametrize("estimator", config_lib.LX_ESTIMATORS)
def test_per_class_matching_sees_swapped_classes(estimator):
  # Balanced classes whose scores are swapped: the pooled distribution barely
  # changes, so only the per-class variant can tell.
  x, z, m = _samples(1, rate=0.5)
  x_swapped = jnp.where(z > 0, 0.3, 0.7) + (x - jnp.where(z > 0, 0.7, 0.3))
  pooled = config_lib.LossConfig(lx_estimator=estimator, lx_per_class=False)
  per_class = dataclasses.replace(pooled, lx_per_class=True)
  assert float(losses.distribution_loss(x_swapped, x, z, m, per_class)) > \
      5 * float(losses.distribution_loss(x_swapped, x, z, m, pooled)) + 1e-4


@pytest.mark.parametrize("estimator", config_lib.LX_ESTIMATORS)
def test_distribution_loss_gradient_reaches_generated_scores_only(estimator):
  cfg = config_lib.LossConfig(lx_estimator=estimator)
  x, z, m = _samples(2)
  g_gen, g_real = jax.grad(lambda a, b: losses.distribution_loss(a, b, z, m, cfg),
                           argnums=(0, 1))(x + 0.1, x)
  assert np.all(np.isfinite(g_gen)) and float(jnp.abs(g_gen).sum()) > 0
  assert float(jnp.abs(g_real).sum()) == 0
  # Padding gets no gradient.
  assert float(jnp.abs(jnp.where(m, 0.0, g_gen)).sum()) == 0


def test_per_class_loss_with_a_missing_class_is_finite():
  cfg = config_lib.LossConfig(lx_estimator="wasserstein", lx_per_class=True)
  x, _, m = _samples(3)
  z = jnp.zeros_like(x)
  val, g = jax.value_and_grad(lambda a: losses.distribution_loss(a, x, z, m, cfg))(x + 0.1)
  assert np.isfinite(float(val)) and np.all(np.isfinite(g))


def test_wasserstein_matches_mean_shift():
  x, z, m = _samples(4, n=(200, 50))
  cfg = config_lib.LossConfig(lx_estimator="wasserstein", lx_per_class=False)
  # Shifting every value by c moves W1 by exactly c (away from the clip boundaries).
  got = float(losses.distribution_loss(x * 0.5 + 0.2, x * 0.5 + 0.1, z, m, cfg))
  np.testing.assert_allclose(got, 0.1, atol=1e-5)
