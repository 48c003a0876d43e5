"""Tests of the noise generators (Eq. 4 and the model generator)."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import noise


def _batch(b=4, n=6, h=3, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, n), bool)
  mask[0, -2:] = False
  labels = (rng.random((b, n)) < 0.3).astype(np.float32) * mask
  return batch_lib.ListBatch.from_arrays(dict(
      user=rng.integers(1, 5, b).astype(np.int32),
      history=rng.integers(1, 20, (b, h)).astype(np.int32),
      history_mask=np.ones((b, h), bool),
      items=(rng.integers(1, 20, (b, n)) * mask).astype(np.int32),
      scores=(rng.random((b, n)) * mask).astype(np.float32),
      labels=labels, mask=mask))


@pytest.mark.parametrize("heuristic", config_lib.HEURISTICS)
@pytest.mark.parametrize("lambda_c", [0.0, 0.4, 1.0])
def test_heuristic_scores_in_unit_interval_and_follow_eq4(heuristic, lambda_c):
  cfg = config_lib.NoiseConfig(heuristic=heuristic, lambda_c=lambda_c)
  b = _batch()
  x = noise.heuristic_scores(jax.random.PRNGKey(0), b.labels, b.mask, cfg)
  chex.assert_shape(x, b.labels.shape)
  assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
  assert np.all(np.asarray(x)[~np.asarray(b.mask)] == 0)
  if lambda_c == 0.0:   # no noise: x' = z
    np.testing.assert_allclose(x, b.labels)


def test_beta_noise_has_beta_moments():
  cfg = config_lib.NoiseConfig(heuristic="beta", beta_a=2.0, beta_b=5.0)
  eps = noise.heuristic_eps(jax.random.PRNGKey(1), (200_000,), cfg)
  assert abs(float(eps.mean()) - 2 / 7) < 0.01
  cfg = config_lib.NoiseConfig(heuristic="gaussian", gaussian_mean=0.3, gaussian_std=0.1)
  eps = noise.heuristic_eps(jax.random.PRNGKey(1), (200_000,), cfg)
  assert abs(float(eps.mean()) - 0.3) < 0.01 and abs(float(eps.std()) - 0.1) < 0.01


def test_mix_positives_score_higher_on_average():
  cfg = config_lib.NoiseConfig(lambda_c=0.5)
  labels = jnp.tile(jnp.array([1.0, 0.0]), 5000)
  x = noise.mix(labels, noise.heuristic_eps(jax.random.PRNGKey(2), labels.shape, cfg),
                0.5, True)
  assert float(x[labels == 1].mean()) - float(x[labels == 0].mean()) > 0.4


def test_unclipped_gaussian_can_leave_unit_interval():
  cfg = config_lib.NoiseConfig(lambda_c=1.0, gaussian_std=1.0, clip=False)
  b = _batch()
  x = noise.heuristic_scores(jax.random.PRNGKey(0), b.labels, b.mask, cfg)
  assert float(x.min()) < 0 or float(x.max()) > 1


def test_model_generator_shapes_range_padding_and_randomness():
  model_cfg = config_lib.ModelConfig(num_items=20, num_users=5)
  gen = noise.make_generator(config_lib.NoiseConfig(generator_hidden=8), model_cfg)
  b = _batch()
  params = gen.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}, b)
  x1 = gen.apply(params, b, rngs={"noise": jax.random.PRNGKey(2)})
  x2 = gen.apply(params, b, rngs={"noise": jax.random.PRNGKey(3)})
  chex.assert_shape(x1, b.labels.shape)
  valid = np.asarray(b.mask)
  assert np.all((np.asarray(x1)[valid] > 0) & (np.asarray(x1)[valid] < 1))
  assert np.all(np.asarray(x1)[~valid] == 0)
  assert not np.allclose(x1, x2)   # the random draw matters
  # Conditioned on z: flipping the labels changes the output.
  x3 = gen.apply(params, b.replace(labels=1 - b.labels), rngs={"noise": jax.random.PRNGKey(2)})
  assert not np.allclose(np.asarray(x1)[valid], np.asarray(x3)[valid])


def test_generated_list_is_sorted_by_the_generated_scores():
  b = _batch(b=5, n=6)
  x = jax.random.uniform(jax.random.PRNGKey(3), b.labels.shape) * b.mask
  out = noise.generated_list(b, x, sort=True)
  xs, m = np.asarray(out.scores), np.asarray(out.mask)
  # Valid candidates first, in descending generated score; padding last.
  assert np.all(np.diff(np.where(m, xs, -1.0), axis=1) <= 0)
  np.testing.assert_array_equal(m, np.asarray(b.mask))   # padding was at the end
  # Every candidate moved with its label, id and generated score.
  for i in range(5):
    before = sorted(zip(np.asarray(b.items)[i], np.asarray(b.labels)[i],
                        np.asarray(x)[i]))
    after = sorted(zip(np.asarray(out.items)[i], np.asarray(out.labels)[i], xs[i]))
    assert before == after
  same = noise.generated_list(b, x, sort=False)
  np.testing.assert_array_equal(same.items, b.items)
  np.testing.assert_array_equal(same.scores, x)


def test_generated_list_passes_gradients_to_the_scores():
  b = _batch()
  x = jnp.asarray(np.random.default_rng(0).random(b.labels.shape), jnp.float32)
  weights = jnp.arange(b.labels.shape[1], dtype=jnp.float32)
  # A loss that depends on the position: the gradient reaches each score at the
  # position it was sorted to.
  g = jax.grad(lambda s: (noise.generated_list(b, s, True).scores * weights).sum())(x)
  order = np.argsort(np.where(np.asarray(b.mask), -np.asarray(x), np.inf), axis=1,
                     kind="stable")
  want = np.zeros_like(np.asarray(x))
  np.put_along_axis(want, order, np.broadcast_to(np.asarray(weights), want.shape), 1)
  np.testing.assert_allclose(g, want)
