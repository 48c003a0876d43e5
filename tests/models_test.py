"""Tests of the rerankers: shapes, score usage, padding, permutation, dropout."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import models

B, N, H = 3, 7, 5


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, N), bool)
  mask[0, -3:] = False
  hmask = np.ones((B, H), bool)
  hmask[1, :2] = False
  return batch_lib.ListBatch.from_arrays(dict(
      user=jnp.asarray(rng.integers(1, 4, B), jnp.int32),
      history=jnp.asarray(rng.integers(1, 30, (B, H)) * hmask, jnp.int32),
      history_mask=jnp.asarray(hmask),
      items=jnp.asarray(rng.integers(1, 30, (B, N)) * mask, jnp.int32),
      scores=jnp.asarray(np.sort(rng.random((B, N)), -1)[:, ::-1] * mask, jnp.float32),
      labels=jnp.asarray((rng.random((B, N)) < 0.3) * mask, jnp.float32),
      mask=jnp.asarray(mask),
      user_features=jnp.asarray(rng.integers(0, 3, (B, 1)), jnp.int32),
      item_features=jnp.asarray(rng.integers(0, 5, (B, N, 2)), jnp.int32)))


def _model(backbone, score_usage="concat"):
  cfg = config_lib.ModelConfig(backbone=backbone, score_usage=score_usage, num_items=30,
                               num_users=4, user_feature_vocab=(3,),
                               item_feature_vocab=(5, 5), hidden=16, num_heads=2,
                               dropout=0.2)
  module = models.make_reranker(cfg)
  params = module.init({"params": jax.random.PRNGKey(0),
                        "dropout": jax.random.PRNGKey(1)}, _batch(), train=False)
  return module, params


_APPLY = {}


def _apply(backbone, score_usage="concat"):
  """A jitted apply per model (eager Flax is slow; these tests run many batches)."""
  key = (backbone, score_usage)
  if key not in _APPLY:
    module, params = _model(backbone, score_usage)
    fn = jax.jit(lambda b, train, k: module.apply(params, b, train=train,
                                                  rngs={"dropout": k}),
                 static_argnums=1)
    _APPLY[key] = fn
  return _APPLY[key]


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
@pytest.mark.parametrize("score_usage", config_lib.SCORE_USAGES)
def test_shapes_and_score_usage(backbone, score_usage):
  f = _apply(backbone, score_usage)
  b = _batch()
  k = jax.random.PRNGKey(0)
  logits = f(b, False, k)
  chex.assert_shape(logits, (B, N))
  chex.assert_tree_all_finite(logits)
  other = f(b.replace(scores=b.scores[:, ::-1] * 0.5), False, k)
  valid = np.asarray(b.mask)
  if score_usage == "none":
    np.testing.assert_array_equal(np.asarray(logits)[valid], np.asarray(other)[valid])
  else:
    assert not np.allclose(np.asarray(logits)[valid], np.asarray(other)[valid])


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
def test_differentiable_in_scores(backbone):
  module, params = _model(backbone)
  b = _batch()
  g = jax.jit(jax.grad(lambda s: module.apply(params, b.replace(scores=s),
                                              train=False).sum()))(b.scores)
  chex.assert_tree_all_finite(g)
  assert float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
def test_padding_does_not_change_valid_logits(backbone):
  f = _apply(backbone)
  b = _batch()
  k = jax.random.PRNGKey(0)
  logits = f(b, False, k)
  pad = ~np.asarray(b.mask)
  hpad = ~np.asarray(b.history_mask)
  changed = b.replace(
      items=jnp.where(pad, 17, b.items), scores=jnp.where(pad, 0.9, b.scores),
      item_features=jnp.where(pad[..., None], 4, b.item_features),
      history=jnp.where(hpad, 23, b.history))
  other = f(changed, False, k)
  valid = np.asarray(b.mask)
  np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(other)[valid],
                             rtol=1e-5, atol=1e-5)


def test_setrank_is_permutation_equivariant_and_prm_is_not():
  b = _batch().replace(mask=jnp.ones((B, N), bool))
  perm = np.array([3, 0, 6, 1, 5, 2, 4])
  permuted = jax.tree.map(lambda x: x[:, perm] if x.ndim >= 2 and x.shape[1] == N
                          else x, b)
  permuted = permuted.replace(history=b.history, history_mask=b.history_mask,
                              user_features=b.user_features)
  k = jax.random.PRNGKey(0)
  s = _apply("setrank")
  np.testing.assert_allclose(s(permuted, False, k), s(b, False, k)[:, perm],
                             rtol=1e-5, atol=1e-5)
  p = _apply("prm")
  assert not np.allclose(p(permuted, False, k), p(b, False, k)[:, perm], atol=1e-4)


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
def test_dropout_only_in_training(backbone):
  f = _apply(backbone)
  b = _batch()
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  np.testing.assert_array_equal(f(b, False, k1), f(b, False, k2))
  assert not np.allclose(f(b, True, k1), f(b, True, k2))


def test_unknown_backbone():
  with pytest.raises(ValueError, match="backbone='gru4rec'"):
    models.make_reranker(config_lib.ModelConfig(backbone="gru4rec"))


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
def test_score_sets_equal_separate_passes(backbone):
  # The train step scores real and generated scores in one pass (score_sets); it
  # must give each set the logits a pass of its own gives.
  module, params = _model(backbone)
  b = _batch()
  other = jnp.asarray(np.random.default_rng(5).random((B, N)), jnp.float32) * b.mask
  both = module.apply(params, b, train=False, score_sets=jnp.stack([b.scores, other]))
  chex.assert_shape(both, (2, B, N))
  np.testing.assert_allclose(both[0], module.apply(params, b, train=False), atol=1e-5)
  np.testing.assert_allclose(both[1], module.apply(params, b.replace(scores=other),
                                                   train=False), atol=1e-5)


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
def test_bfloat16_compute_keeps_float32_params_and_logits(backbone):
  cfg = config_lib.ModelConfig(backbone=backbone, num_items=30, num_users=4,
                               user_feature_vocab=(3,), item_feature_vocab=(5, 5),
                               hidden=16, num_heads=2, compute_dtype="bfloat16")
  module = models.make_reranker(cfg)
  params = module.init({"params": jax.random.PRNGKey(0)}, _batch(), train=False)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = module.apply(params, _batch(), train=False)
  assert logits.dtype == jnp.float32
  # Same parameters in float32: bfloat16 (8 bits of mantissa) is close, not equal.
  ref = models.make_reranker(config_lib.ModelConfig(
      **{**cfg.__dict__, "compute_dtype": "float32"})).apply(params, _batch(), train=False)
  np.testing.assert_allclose(logits, ref, atol=0.1)
  assert not np.array_equal(logits, ref)


@pytest.mark.parametrize("backbone", config_lib.BACKBONES)
def test_export_formulation_has_the_same_parameters_and_logits(backbone):
  # make_reranker(export=True) is what the ONNX export traces (DLCM's GRU unrolled
  # instead of flax's scan): the same parameter tree from the same key, and the same
  # logits bit for bit, with padding, an empty list and two score sets.
  module, params = _model(backbone)
  unrolled = models.make_reranker(module.config, export=True)
  if backbone == "dlcm":
    assert unrolled.unroll and not module.unroll
  again = unrolled.init({"params": jax.random.PRNGKey(0),
                         "dropout": jax.random.PRNGKey(1)}, _batch(), train=False)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  b = _batch(seed=3)
  empty = (jnp.arange(B) == 2)[:, None]                     # an empty list too
  b = b.replace(mask=b.mask & ~empty, items=jnp.where(empty, 0, b.items),
                scores=jnp.where(empty, 0.0, b.scores))
  sets = jnp.stack([b.scores, b.scores[:, ::-1] * b.mask])
  run = lambda m, **kw: np.asarray(jax.jit(
      lambda b: m.apply(params, b, train=False, **kw))(b))
  np.testing.assert_array_equal(run(unrolled), run(module))
  np.testing.assert_array_equal(run(unrolled, score_sets=sets),
                                run(module, score_sets=sets))
