"""Row-sharded embedding tables (``TrainConfig.model_parallel``) against replicated ones.

conftest.py gives this process 8 fake CPU devices. The sharded step must compute
what the replicated step computes on the same 8 devices: the forward lookups are
exact, and the gradients differ only by the order of floating-point sums, so the
states after a few steps agree to ``RTOL`` / ``ATOL``.
"""

import dataclasses

import jax
import numpy as np
import pytest

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import step as step_lib
from dnr_jax import synthetic
from dnr_jax.models import tables
from dnr_jax.runtime import pipeline
from dnr_jax.runtime import runner as runner_lib

# 41 items and 29 users: not multiples of 2 or 4, so every table is padded.
DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=29, num_items=41, list_size=8, history_size=4, num_lists=(64, 16, 16)))
RTOL, ATOL = 2e-5, 2e-6
STEPS = 3


def _config(method, backbone="prm", model_parallel=1, **kw):
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(num_items=DATA.num_items, num_users=DATA.num_users,
                                   hidden=16, num_heads=2, dropout=0.1,
                                   backbone=backbone, pier_window=2),
      noise=config_lib.NoiseConfig(generator_hidden=8),
      warmup_epochs=0, global_batch_size=32, eval_batch_size=32,
      model_parallel=model_parallel)
  return dataclasses.replace(config_lib.apply_method(cfg, method), **kw)


def _batches():
  train = pipeline.complete(DATA.splits["train"])
  return [{k: v[i * 32:(i + 1) * 32] for k, v in train.items()} for i in range(2)]


def _run(cfg, phase):
  """``STEPS`` train steps, then the eval step: host state, metrics, sums, logits."""
  runner = runner_lib.Runner(cfg)
  batches = _batches()
  example = batch_lib.ListBatch.from_arrays({k: v[:4] for k, v in batches[0].items()})
  state = runner.put_state(step_lib.create_state(cfg, example, jax.random.PRNGKey(0)))
  metrics = []
  for i in range(STEPS):
    state, m = runner.train(state, batches[i % 2], phase)
    metrics.append(jax.device_get(m))
  sums, logits = runner.evaluate(state, batches[0])
  return runner.get_state(state), metrics, jax.device_get(sums), np.asarray(logits)


def _paths(tree):
  return [(jax.tree_util.keystr(p), np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _compared(state):
  """The leaves of a state but the attention key biases.

  Attention is invariant to the key bias, so its gradient is zero but for rounding
  (about 1e-10 here), and Adam turns that rounding into steps of about the learning
  rate: the key biases differ by the order of floating-point sums alone, between
  any two programs (their Adam moments, tiny, are compared).
  """
  return [x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
          if not jax.tree_util.keystr(p).endswith("['key']['bias']")
          or ".mu" in jax.tree_util.keystr(p) or ".nu" in jax.tree_util.keystr(p)]


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL), a, b)


CASES = [("backbone", "direct"), ("heuristic_g", "heuristic"), ("dnr_g", "model"),
         ("c_score", "direct")]


# PRM in every phase; PIER (tables of its own) in the model phase, which runs its
# reranker as the direct phase does and adds the generator.
@pytest.mark.parametrize("method,phase,backbone",
                         [(m, p, "prm") for m, p in CASES] + [("dnr_g", "model", "pier")])
def test_sharded_step_equals_replicated(backbone, method, phase):
  ref = _run(_config(method, backbone), phase)
  for m in (2, 4) if (method, backbone) == ("dnr_g", "prm") else (4,):
    got = _run(_config(method, backbone, model_parallel=m), phase)
    # Same leaves, same (unpadded) shapes, same values.
    assert _paths(got[0]) == _paths(ref[0])
    _assert_close(_compared(got[0]), _compared(ref[0]))
    _assert_close(got[1], ref[1])
    _assert_close(got[2], ref[2])
    np.testing.assert_allclose(got[3], ref[3], rtol=RTOL, atol=ATOL)
    # The tables moved: a test of equal copies of the initial state would pass too.
    moved = np.abs(got[0].reranker.params["tokens"]["item_embed"]["embedding"]
                   - _initial(method, backbone)).max()
    assert moved > 1e-4


def _initial(method, backbone):
  cfg = _config(method, backbone)
  example = batch_lib.ListBatch.from_arrays(
      {k: v[:4] for k, v in _batches()[0].items()})
  return np.asarray(step_lib.create_state(cfg, example, jax.random.PRNGKey(0))
                    .reranker.params["tokens"]["item_embed"]["embedding"])


@pytest.mark.parametrize("backbone", ["setrank", "dlcm"])
def test_other_backbones_sharded_equal_replicated(backbone):
  """The tables, losses, gradient norms and logits. (SetRank's attention to its
  inducing points starts near uniform, so the gradients of its queries are near
  zero too, and Adam turns their rounding into visible steps, as for the key
  biases: its dense parameters are compared through the logits they give.)"""
  ref = _run(_config("c_score", backbone), "direct")
  got = _run(_config("c_score", backbone, model_parallel=4), "direct")
  tables_of = lambda state: [x for p, x in jax.tree_util.tree_flatten_with_path(
      state.reranker.params)[0] if tables.table_name(p)]
  assert len(tables_of(got[0])) == 2
  _assert_close(tables_of(got[0]), tables_of(ref[0]))
  _assert_close(got[1], ref[1])
  np.testing.assert_allclose(got[3], ref[3], rtol=RTOL, atol=ATOL)


def test_simultaneous_order_sharded_equals_replicated():
  kw = dict(adversarial_order="simultaneous")
  ref = _run(_config("dnr_g", **kw), "model")
  got = _run(_config("dnr_g", model_parallel=2, **kw), "model")
  _assert_close(_compared(got[0]), _compared(ref[0]))
  _assert_close(got[1], ref[1])


def test_tables_are_split_by_rows_and_padded():
  cfg = _config("dnr_g", model_parallel=4)
  runner = runner_lib.Runner(cfg)
  example = batch_lib.ListBatch.from_arrays(
      {k: v[:4] for k, v in _batches()[0].items()})
  host = step_lib.create_state(cfg, example, jax.random.PRNGKey(0))
  placed = runner.put_state(host)
  table = placed.reranker.params["tokens"]["item_embed"]["embedding"]
  rows = tables.padded_rows(DATA.num_items, 4)
  assert table.shape == (rows, 16) and rows > DATA.num_items
  # Each device holds a quarter of the rows (its 'model' position's), the padding
  # rows are zero, and the Adam moments are split the same way.
  assert {s.data.shape for s in table.addressable_shards} == {(rows // 4, 16)}
  np.testing.assert_array_equal(np.asarray(table)[DATA.num_items:], 0)
  mu = placed.reranker.opt_state[1][0].mu["tokens"]["item_embed"]["embedding"]
  assert {s.data.shape for s in mu.addressable_shards} == {(rows // 4, 16)}
  gen = placed.generator.params["user_embed"]["embedding"]
  assert {s.data.shape for s in gen.addressable_shards} == {
      (tables.rows_per_shard(DATA.num_users, 4), 8)}
  # Everything else is replicated.
  dense = placed.reranker.params["head_in"]["kernel"]
  assert {s.data.shape for s in dense.addressable_shards} == {dense.shape}
  # The host copy is the original, unpadded.
  back = runner.get_state(placed)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(back),
               jax.tree.leaves(host))


def test_the_state_is_created_split_with_the_replicated_values():
  cfg = _config("dnr_g", model_parallel=4)
  runner = runner_lib.Runner(cfg)
  example = batch_lib.ListBatch.from_arrays(
      {k: v[:4] for k, v in _batches()[0].items()})
  created = runner.init_state(example, jax.random.PRNGKey(0))
  table = created.generator.params["item_embed"]["embedding"]
  assert {s.data.shape for s in table.addressable_shards} == {
      (tables.rows_per_shard(DATA.num_items, 4), 8)}
  # Already placed: put_state keeps the arrays as they are.
  assert runner.put_state(created).generator.params["item_embed"]["embedding"] is table
  host = step_lib.create_state(_config("dnr_g"), example, jax.random.PRNGKey(0))
  for a, b in zip(jax.tree.leaves(runner.get_state(created)), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_model_parallel_is_refused():
  with pytest.raises(errors.ConfigError, match="does not divide the 8 devices"):
    runner_lib.Runner(_config("dnr_g", model_parallel=3))
  with pytest.raises(config_lib.ConfigError, match="needs compile='shard_map'"):
    config_lib.validate(_config("dnr_g", model_parallel=2, compile="pmap"))
  with pytest.raises(errors.ConfigError, match="needs compile='shard_map'"):
    runner_lib.Runner(_config("dnr_g", model_parallel=2, compile="pmap"))
  with pytest.raises(config_lib.ConfigError, match="does not divide the 8 devices"):
    config_lib.validate(_config("dnr_g", model_parallel=3), num_devices=8)
