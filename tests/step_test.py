"""Tests of the DNR train step: gradient routing, devices, compilation, randomness.

conftest.py gives this process 8 fake CPU devices.
"""

import dataclasses

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import noise as noise_lib
from dnr_jax import parallel
from dnr_jax.runtime import pipeline
from dnr_jax import step as step_lib
from dnr_jax.runtime import runner as runner_lib
from dnr_jax import synthetic

DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=30, num_items=40, list_size=8, history_size=4, num_lists=(64, 16, 16)))


def _config(method="dnr_g", **kw):
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(num_items=DATA.num_items, num_users=DATA.num_users,
                                   hidden=16, num_heads=2, dropout=0.1),
      noise=config_lib.NoiseConfig(generator_hidden=8),
      warmup_epochs=0, global_batch_size=16, eval_batch_size=16)
  return dataclasses.replace(config_lib.apply_method(cfg, method), **kw)


def _arrays(n=16, start=0):
  train = pipeline.complete(DATA.splits["train"])
  return {k: v[start:start + n] for k, v in train.items()}


def _state(cfg, n=16):
  return step_lib.create_state(cfg, batch_lib.ListBatch.from_arrays(_arrays(n)),
                               jax.random.PRNGKey(0))


def _nonzero(tree):
  return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree)) > 0


def _zero(tree):
  return all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("phase", ["heuristic", "model"])
def test_reranker_terms_give_no_gradient_to_generator(phase):
  cfg = _config()
  state = _state(cfg)
  b = batch_lib.ListBatch.from_arrays(_arrays())
  keys = tuple(jax.random.split(jax.random.PRNGKey(1), 3))
  for term in ("l_direct", "l_z"):
    f = lambda th, ph: step_lib.reranker_objective(th, ph, b, keys, config=cfg,
                                                   phase=phase)[1][term]
    g_theta, g_phi = jax.jit(jax.grad(f, argnums=(0, 1)))(state.reranker.params,
                                                          state.generator.params)
    assert _nonzero(g_theta), term
    assert _zero(g_phi), term


@pytest.mark.parametrize("term", ["l_adv", "l_x"])
def test_generator_terms_give_no_gradient_to_reranker(term):
  cfg = _config()
  state = _state(cfg)
  b = batch_lib.ListBatch.from_arrays(_arrays())
  f = lambda ph, th: step_lib.generator_objective(ph, th, b, jax.random.PRNGKey(2),
                                                  config=cfg)[1][term]
  g_phi, g_theta = jax.jit(jax.grad(f, argnums=(0, 1)))(state.generator.params,
                                                        state.reranker.params)
  assert _nonzero(g_phi)
  assert _zero(g_theta)


def test_noise_differs_across_devices():
  devices = jax.devices()[:8]
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), (step_lib.AXIS,))
  labels = jnp.tile(jnp.array([[1.0, 0.0, 1.0, 0.0]]), (8, 1))  # same rows everywhere
  mask = jnp.ones_like(labels, bool)
  ncfg = config_lib.NoiseConfig()

  def body(key, labels, mask):
    k = step_lib.device_step_key(key, jnp.int32(3))
    return noise_lib.heuristic_scores(k, labels, mask, ncfg)

  out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                              out_specs=P("batch")))(jax.random.PRNGKey(0), labels, mask)
  rows = np.asarray(out)
  assert len({r.tobytes() for r in rows}) == 8


def test_pmap_and_shard_map_agree():
  # The model phase runs every part of the body: noise, both players, collectives.
  method, phase = "dnr_g", "model"
  results = {}
  for compile_mode in ("pmap", "shard_map"):
    cfg = _config(method, compile=compile_mode)
    runner = runner_lib.Runner(cfg, tuple(jax.devices()[:8]))
    state = runner.put_state(_state(cfg))
    for i in range(3):
      state, metrics = runner.train(state, _arrays(16, 16 * i), phase)
    results[compile_mode] = (runner.get_state(state), jax.device_get(metrics))
  (s1, m1), (s2, m2) = results["pmap"], results["shard_map"]
  assert int(s1.step) == int(s2.step) == 3
  chex.assert_trees_all_close(s1.reranker.params, s2.reranker.params, atol=1e-5)
  chex.assert_trees_all_close(s1.generator.params, s2.generator.params, atol=1e-5)
  chex.assert_trees_all_close(m1, m2, atol=1e-5)
  # The generator did train.
  assert not np.allclose(jax.tree.leaves(s1.generator.params)[0],
                         jax.tree.leaves(_state(_config(method)).generator.params)[0])


def test_step_compiles_once_per_phase():
  cfg = _config("dnr_b", compile="shard_map")
  runner = runner_lib.Runner(cfg, tuple(jax.devices()[:2]))
  state = runner.put_state(_state(cfg))
  for i, phase in enumerate(["heuristic", "heuristic", "model", "model", "model"]):
    state, m = runner.train(state, _arrays(16, 16 * (i % 4)), phase)
    assert np.isfinite(m["l_theta"])
  assert runner.traces == {"heuristic": 1, "model": 1}
  # A batch of another shape would retrace; the guard turns that into an error.
  with pytest.raises(RuntimeError, match="compiled a second time"):
    runner.train(state, _arrays(8), "model")


def test_state_is_donated():
  cfg = _config("c_score", compile="shard_map")
  runner = runner_lib.Runner(cfg, tuple(jax.devices()[:2]))
  state = runner.put_state(_state(cfg))
  leaf = jax.tree.leaves(state.reranker.params)[0]
  runner.train(state, _arrays(), "direct")
  assert leaf.is_deleted()


def test_phase_schedule_follows_algorithm_1():
  cfg = _config("dnr_g", warmup_epochs=2)
  assert [step_lib.phase_for_epoch(cfg, e) for e in range(4)] == \
      ["heuristic", "heuristic", "model", "model"]
  assert step_lib.phase_for_epoch(_config("heuristic_g"), 99) == "heuristic"
  assert step_lib.phase_for_epoch(_config("w_score"), 0) == "direct"


def test_batch_not_divisible_by_devices_fails_clearly():
  cfg = _config("c_score")
  runner = runner_lib.Runner(cfg, tuple(jax.devices()[:8]))
  with pytest.raises(ValueError, match="12 lists is not divisible by the 8 devices"):
    runner.put_batch(_arrays(12))


def test_shared_pass_step_equals_reference_two_pass_step():
  # benchmarks/reference_step.py is the step before the shared reranker pass (three
  # full forward passes). Without dropout the two formulations are the same
  # computation. (With dropout they differ only in which dropout masks are drawn;
  # see step.reranker_objective.)
  from benchmarks import reference_step
  cfg = _config("dnr_g", compile="shard_map")
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
  state = _state(cfg)
  b = batch_lib.ListBatch.from_arrays(_arrays())
  keys = tuple(jax.random.split(jax.random.PRNGKey(1), 3))
  grads = {}
  for name, module in (("new", step_lib), ("ref", reference_step)):
    grads[name] = jax.jit(jax.grad(lambda th, m=module: m.reranker_objective(
        th, state.generator.params, b, keys, config=cfg, phase="model")[0]))(
            state.reranker.params)
  chex.assert_trees_all_close(grads["new"], grads["ref"], rtol=1e-4, atol=1e-7)

  # And the whole step, both players, over three steps. Adam turns float rounding in
  # tiny gradients into parameter differences of a fraction of the learning rate
  # (1e-3 per step), so parameters agree to 2e-4, well below one step's change;
  # except the attention key biases, whose gradient is zero in exact arithmetic
  # (softmax ignores a shift shared by all keys): Adam normalises their rounding
  # noise into steps of up to the learning rate.
  runner = runner_lib.Runner(cfg, tuple(jax.devices()[:2]))
  ref_fn = runner.compile_step(
      lambda s, b: reference_step.train_step(s, b, config=cfg, phase="model"),
      out_specs=lambda specs: (specs, P()), donate=False)
  new, ref = runner.put_state(_state(cfg)), runner.put_state(_state(cfg))
  for i in range(3):
    batch = runner.put_batch(_arrays(16, 16 * i))
    new, m_new = runner.train(new, batch, "model")
    ref, m_ref = ref_fn(ref, batch)
  flat_new = flax.traverse_util.flatten_dict(jax.device_get(new.reranker.params), sep="/")
  flat_ref = flax.traverse_util.flatten_dict(jax.device_get(ref.reranker.params), sep="/")
  for name, value in flat_ref.items():
    atol = 3 * cfg.learning_rate if name.endswith("key/bias") else 2e-4
    np.testing.assert_allclose(flat_new[name], value, atol=atol, err_msg=name)
  chex.assert_trees_all_close(new.generator.params, ref.generator.params, atol=2e-4)
  for k in m_ref:
    np.testing.assert_allclose(m_new[k], m_ref[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_a_non_finite_step_is_not_applied_but_counted():
  cfg = _config("dnr_g", compile="shard_map")
  runner = runner_lib.Runner(cfg, tuple(jax.devices()[:1]))
  state = runner.put_state(_state(cfg))
  poisoned = _arrays()
  poisoned["scores"] = poisoned["scores"].copy()
  poisoned["scores"][3] = np.nan
  before = runner.get_state(state)
  state, m = runner.train(state, poisoned, "model")
  after = runner.get_state(state)
  assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["l_theta"]))
  chex.assert_trees_all_equal((before.reranker, before.generator),
                              (after.reranker, after.generator))
  assert int(after.step) == int(before.step) + 1   # the randomness moves on
  state, m = runner.train(state, _arrays(), "model")
  assert float(m["nonfinite"]) == 0.0
  assert _nonzero(jax.tree.map(lambda a, b: a - b, runner.get_state(state).reranker.params,
                               after.reranker.params))


def test_global_norm_and_clipping_equal_optax():
  # step.py computes norms as one dot product (XLA GPU rejected optax's form in the
  # model phase); the rule must stay optax's clip_by_global_norm exactly.
  import optax  # pylint: disable=g-import-not-at-top
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  tree = {"w": jax.random.normal(k1, (5, 3)), "b": jax.random.normal(k2, (1,)),
          "s": jax.random.normal(k3, ())}
  np.testing.assert_allclose(parallel.global_norm(tree), optax.tree.norm(tree),
                             rtol=1e-6)
  for max_norm in (0.5, 100.0):  # clipped, and left alone
    ours, _ = parallel.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    chex.assert_trees_all_close(ours, ref, rtol=1e-6)
  assert float(parallel.global_norm({})) == 0.0
