"""The adversarial phase's two orders (TrainConfig.adversarial_order, dnr_jax/step.py).

"sequential" is Algorithm 1; "simultaneous" takes phi's gradient from theta's own
pass. These tests pin the one-pass gradients against plain autodiff and show what the
two orders share (theta's update) and what they do not (phi's).
"""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import losses
from dnr_jax import noise as noise_lib
from dnr_jax.runtime import pipeline
from dnr_jax import step as step_lib
from dnr_jax.runtime import runner as runner_lib
from dnr_jax import synthetic

DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=30, num_items=40, list_size=8, history_size=4, num_lists=(32, 8, 8)))


def _config(**kw):
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(num_items=DATA.num_items, num_users=DATA.num_users,
                                   hidden=16, num_heads=2, dropout=0.1),
      noise=config_lib.NoiseConfig(generator_hidden=8),
      # Weights other than 1 so that a wrong scale in the one-pass trick shows.
      loss=config_lib.LossConfig(lambda_m=0.4, lambda_adv=0.7, lambda_x=1.3),
      warmup_epochs=0, global_batch_size=16, eval_batch_size=16)
  return dataclasses.replace(config_lib.apply_method(cfg, "dnr_g"), **kw)


def _batch():
  train = pipeline.complete(DATA.splits["train"])
  return batch_lib.ListBatch.from_arrays({k: v[:16] for k, v in train.items()})


@pytest.mark.parametrize("sort_generated", [False, True])
def test_one_pass_gradients_equal_plain_autodiff(sort_generated):
  cfg = _config(adversarial_order="simultaneous")
  cfg = dataclasses.replace(cfg, noise=dataclasses.replace(
      cfg.noise, sort_generated=sort_generated))
  b = _batch()
  state = step_lib.create_state(cfg, b, jax.random.PRNGKey(0))
  theta, phi = state.reranker.params, state.generator.params
  keys = tuple(jax.random.split(jax.random.PRNGKey(1), 3))

  g_theta, g_phi, terms = jax.jit(
      lambda th, ph: step_lib.simultaneous_grads(th, ph, b, keys, config=cfg))(theta, phi)

  # theta: exactly the sequential order's objective, same keys.
  (_, ref_terms), ref_theta = jax.jit(jax.value_and_grad(
      lambda th: step_lib.reranker_objective(th, phi, b, keys, config=cfg,
                                             phase="model"), has_aux=True))(theta)
  chex.assert_trees_all_close(g_theta, ref_theta, rtol=1e-5, atol=1e-7)
  for k, v in ref_terms.items():
    np.testing.assert_allclose(terms[k], v, rtol=1e-6)

  # phi: L_phi = lambda_adv L_adv + lambda_x L_x on the same (pre-update, dropout-on)
  # pass, differentiated directly through the generator and the reranker.
  generator = noise_lib.make_generator(cfg.noise, cfg.model)

  def l_phi(ph):
    x = generator.apply({"params": ph}, b, rngs={"noise": keys[2]})
    _, t = step_lib.reranker_loss(theta, b, x, keys[:2], config=cfg)
    l_x = losses.distribution_loss(x, b.scores, b.labels, b.mask, cfg.loss)
    return cfg.loss.lambda_adv * -t["l_z"] + cfg.loss.lambda_x * l_x

  ref_value, ref_phi = jax.jit(jax.value_and_grad(l_phi))(phi)
  np.testing.assert_allclose(terms["l_phi"], ref_value, rtol=1e-6)
  np.testing.assert_allclose(terms["l_adv"], -terms["l_z"])
  chex.assert_trees_all_close(g_phi, ref_phi, rtol=1e-4, atol=1e-7)
  assert any(float(abs(x).max()) > 0 for x in jax.tree.leaves(g_phi))


def test_the_orders_share_theta_update_and_differ_in_phi():
  results = {}
  for order in config_lib.ADVERSARIAL_ORDERS:
    cfg = _config(adversarial_order=order)
    runner = runner_lib.Runner(cfg, tuple(jax.devices()[:2]))
    state = runner.put_state(step_lib.create_state(cfg, _batch(), jax.random.PRNGKey(0)))
    arrays = {k: v[:16] for k, v in pipeline.complete(DATA.splits["train"]).items()}
    state, metrics = runner.train(state, arrays, "model")
    results[order] = (runner.get_state(state), jax.device_get(metrics))
  (s_seq, m_seq), (s_sim, m_sim) = results["sequential"], results["simultaneous"]
  assert set(m_seq) == set(m_sim)      # the same metrics, the same logs and guards
  # theta is updated first in both orders, from the same draws: the same update.
  chex.assert_trees_all_close(s_seq.reranker.params, s_sim.reranker.params, atol=1e-6)
  np.testing.assert_allclose(m_seq["l_theta"], m_sim["l_theta"], rtol=1e-6)
  # phi attacks another reranker (updated, no dropout vs pre-update, dropout on).
  diff = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(s_seq.generator.params), jax.tree.leaves(s_sim.generator.params)))
  assert diff > 0
  assert int(s_sim.step) == 1 and m_sim["nonfinite"] == 0


def test_an_unknown_order_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match="adversarial_order='reverse'"):
    config_lib.validate(_config(adversarial_order="reverse"))
