"""Tests of the PIER backbone (OCPM) and FPSM's permutation search.

The shared backbone tests (shapes, every score usage, padding, dropout,
differentiability) run on PIER through ``tests/models_test.py``, which covers every
``config.BACKBONES``; these tests pin what is PIER's own.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import metrics as metrics_lib
from dnr_jax.models import pier
from dnr_jax.runtime import pipeline
from dnr_jax import step as step_lib
from dnr_jax.runtime import runner as runner_lib
from dnr_jax import synthetic
from dnr_jax import train as train_lib

B, N, H, ITEMS = 4, 7, 8, 30


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, N), bool)
  mask[0, -3:] = False
  hmask = np.ones((B, H), bool)
  hmask[1, :3] = False           # a short history (padding on the left, oldest side)
  hmask[2, :] = False            # no history at all
  return batch_lib.ListBatch.from_arrays(dict(
      user=jnp.asarray(rng.integers(1, 4, B), jnp.int32),
      history=jnp.asarray(rng.integers(1, ITEMS, (B, H)) * hmask, jnp.int32),
      history_mask=jnp.asarray(hmask),
      items=jnp.asarray(rng.integers(1, ITEMS, (B, N)) * mask, jnp.int32),
      scores=jnp.asarray(np.sort(rng.random((B, N)), -1)[:, ::-1] * mask, jnp.float32),
      labels=jnp.asarray((rng.random((B, N)) < 0.3) * mask, jnp.float32),
      mask=jnp.asarray(mask),
      user_features=jnp.zeros((B, 0), jnp.int32),
      item_features=jnp.asarray(rng.integers(0, 5, (B, N, 1)), jnp.int32)))


CFG = config_lib.ModelConfig(backbone="pier", num_items=ITEMS, num_users=4,
                             item_feature_vocab=(5,), hidden=16, num_heads=2,
                             dropout=0.0, pier_window=3)


@pytest.fixture(scope="module")
def model():
  module = pier.PIER(CFG)
  params = module.init({"params": jax.random.PRNGKey(0)}, _batch(), train=False)["params"]
  # Zero-initialised offset biases would hide the omnidirectional attention's
  # position terms from the permutation tests; give them values, as training does.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(jax.random.PRNGKey(3), x.shape)
                       if "offset_bias" in jax.tree_util.keystr(path) else x), params)
  apply = jax.jit(lambda b: module.apply({"params": params}, b, train=False))
  return params, apply


def test_history_permutations_align_on_the_most_recent_item():
  hist = jnp.array([[0, 0, 1, 2, 3, 4, 5]], jnp.int32)
  items, mask = pier.history_permutations(hist, hist > 0, 3)
  np.testing.assert_array_equal(items, [[[0, 0, 0], [0, 1, 2], [3, 4, 5]]])
  np.testing.assert_array_equal(mask[0].any(-1), [False, True, True])


def test_scores_depend_on_the_context(model):
  _, apply = model
  b = _batch().replace(mask=jnp.ones((B, N), bool))
  logits = apply(b)
  # Another item at position 5 changes the scores of the items at positions 0..4.
  items = jnp.asarray(b.items)
  other = apply(b.replace(items=items.at[:, 5].set((items[:, 5] % (ITEMS - 1)) + 1)))
  assert not np.allclose(np.asarray(logits)[:, :5], np.asarray(other)[:, :5], atol=1e-5)
  # Not permutation-equivariant: an item's score depends on where it is shown.
  perm = np.array([3, 0, 6, 1, 5, 2, 4])
  permuted = pier.permute_batch(b, jnp.broadcast_to(perm, (B, N)))
  assert not np.allclose(apply(permuted), np.asarray(logits)[:, perm], atol=1e-4)


def test_history_changes_scores_but_not_its_padding(model):
  _, apply = model
  b = _batch()
  logits = np.asarray(apply(b))
  valid = np.asarray(b.mask)
  hmask = np.asarray(b.history_mask)
  # Padding ids in the history (row 1's left part, row 2 entirely) are ignored,
  # including a list with no history at all.
  padded = apply(b.replace(history=jnp.where(hmask, b.history, 11)))
  np.testing.assert_allclose(np.asarray(padded)[valid], logits[valid], atol=1e-5)
  # Real history items matter (rows 0, 1 and 3).
  moved = np.asarray(apply(b.replace(history=jnp.where(hmask, (b.history % (ITEMS - 1)) + 1,
                                                       0))))
  for row in (0, 1, 3):
    assert not np.allclose(moved[row][valid[row]], logits[row][valid[row]], atol=1e-5)


def _brute_force_similarity(params, b, key, num_bits, window):
  """SimHash similarity in numpy, for the candidates that ``fpsm_search`` reports."""
  table = np.asarray(params["tokens"]["item_embed"]["embedding"])
  _, k_hash = jax.random.split(key)
  planes = np.asarray(jax.random.normal(k_hash, (table.shape[1], num_bits)))
  w = lambda n: 1.0 / np.log2(np.arange(n) + 2.0)
  hist, hmask = map(np.asarray, pier.history_permutations(b.history, b.history_mask,
                                                          window))
  items, mask = np.asarray(b.items), np.asarray(b.mask)

  def sig(ids, m):
    return (((w(len(ids)) * m)[:, None] * table[ids]).sum(0) @ planes) > 0

  def similarity(row, perm):
    sc = sig(items[row][perm], mask[row][perm])
    sims = [1 - (sc != sig(hist[row, q], hmask[row, q])).sum() / num_bits
            for q in range(hist.shape[1]) if hmask[row, q].any()]
    return np.mean(sims) if sims else 0.0
  return similarity


def test_fpsm_search(model):
  params, apply = model
  b = _batch()
  key = jax.random.PRNGKey(7)
  kw = dict(num_permutations=6, top_k=3, num_bits=16, window=CFG.pier_window)
  table = params["tokens"]["item_embed"]["embedding"]
  search = jax.jit(lambda k: pier.fpsm_search(k, b, apply, table, **kw))
  r = search(key)
  chex.assert_shape(r.permutation, (B, N))
  chex.assert_shape(r.candidates, (B, 6, N))
  chex.assert_shape([r.selected, r.values], (B, 3))
  # Deterministic given the key.
  chex.assert_trees_all_equal(r, search(key))
  valid = np.asarray(b.mask)
  for row in range(B):
    perm = np.asarray(r.permutation[row])
    nv = valid[row].sum()
    # A permutation of the valid candidates; padding stays where it is (at the end).
    assert sorted(perm[:nv]) == list(range(nv))
    np.testing.assert_array_equal(perm[nv:], np.arange(nv, N))
  # Candidate 0 is the stored order, candidate 1 the order of OCPM's logits.
  np.testing.assert_array_equal(r.candidates[:, 0], np.tile(np.arange(N), (B, 1)))
  logits = np.where(valid, np.asarray(apply(b)), -np.inf)
  np.testing.assert_array_equal(r.candidates[:, 1], np.argsort(-logits, -1, kind="stable"))
  # The selected candidates are the most similar ones, by an independent SimHash.
  similarity = _brute_force_similarity(params, b, key, kw["num_bits"], kw["window"])
  for row in range(B):
    expect = [similarity(row, np.asarray(r.candidates[row, p])) for p in range(6)]
    np.testing.assert_allclose(r.similarity[row], expect, atol=1e-6)
    sel = set(np.asarray(r.selected[row]).tolist())
    worst_selected = min(expect[p] for p in sel)
    assert all(expect[p] <= worst_selected for p in range(6) if p not in sel)
  assert float(r.similarity[2].max()) == 0.0  # no history, no similarity
  # The result is the best of the selected permutations, each scored by OCPM.
  for row in range(B):
    vals = []
    for p in np.asarray(r.selected[row]):
      perm = jnp.asarray(r.candidates[row, p])[None]
      one = pier.permute_batch(jax.tree.map(lambda x: x[row:row + 1], b), perm)
      vals.append(float(pier.permutation_value(apply(one), one.mask)[0]))
    np.testing.assert_allclose(r.values[row], vals, rtol=1e-5)
    best = int(np.argmax(vals))
    np.testing.assert_array_equal(r.permutation[row],
                                  r.candidates[row, int(r.selected[row, best])])
    np.testing.assert_allclose(r.value[row], max(vals), rtol=1e-5)


def test_fpsm_rerank_and_permutation_logits(model):
  params, _ = model
  b = _batch()
  rerank = jax.jit(lambda k, p: pier.fpsm_rerank(k, p, CFG, b, num_permutations=4,
                                                  top_k=4))
  r = rerank(jax.random.PRNGKey(1), params)
  # With every candidate scored, the stored order (candidate 0) is among them.
  assert np.all(np.asarray(r.value) >= np.asarray(r.values).min(-1))
  assert 0 in np.asarray(r.selected[0])
  logits = pier.permutation_logits(r.permutation)
  np.testing.assert_array_equal(np.argsort(-np.asarray(logits), -1, kind="stable"),
                                r.permutation)
  with pytest.raises(ValueError, match="top_k"):
    pier.fpsm_search(jax.random.PRNGKey(0), b, lambda x: x.scores,
                     params["tokens"]["item_embed"]["embedding"], num_permutations=4,
                     top_k=5)
  with pytest.raises(ValueError, match="backbone='pier'"):
    pier.fpsm_rerank(jax.random.PRNGKey(0), params, dataclasses.replace(
        CFG, backbone="prm"), b)


def test_fpsm_ranking_ranks_each_list_by_its_search(model):
  params, _ = model
  cfg = dataclasses.replace(CFG, fpsm_permutations=4, fpsm_top_k=2)
  arrays = pipeline.complete(jax.tree.map(np.asarray, _batch().as_dict()))
  logits = train_lib.ranked_logits(pier.fpsm_ranking(cfg), params, arrays, 2,
                                   seed=5)   # two batches of 2
  chex.assert_shape(logits, (B, N))
  rerank = jax.jit(lambda k, b: pier.fpsm_rerank(k, params, cfg, b, num_permutations=4,
                                                  top_k=2))
  for i in range(2):
    part = batch_lib.ListBatch.from_arrays(
        {k: v[2 * i:2 * i + 2] for k, v in arrays.items()})
    r = rerank(jax.random.fold_in(jax.random.PRNGKey(5), i), part)
    np.testing.assert_array_equal(
        np.argsort(-np.asarray(logits[2 * i:2 * i + 2]), -1, kind="stable"),
        r.permutation)


DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=20, num_items=30, list_size=6, history_size=6, num_lists=(32, 8, 8)))


def _train_config(method, **kw):
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(backbone="pier", num_items=DATA.num_items,
                                   num_users=DATA.num_users, hidden=8, num_heads=2,
                                   dropout=0.1, pier_window=3),
      noise=config_lib.NoiseConfig(generator_hidden=8),
      warmup_epochs=0, global_batch_size=16, eval_batch_size=16)
  return dataclasses.replace(config_lib.apply_method(cfg, method), **kw)


def _arrays(start=0):
  train = pipeline.complete(DATA.splits["train"])
  return {k: v[start:start + 16] for k, v in train.items()}


def test_train_step_in_every_phase_and_pmap_equals_shard_map():
  # The model phase runs every part of the body (noise, both players, collectives)
  # and must agree between the two compilations; the other phases must run.
  devices = tuple(jax.devices()[:2])
  example = batch_lib.ListBatch.from_arrays(_arrays())
  results = {}
  for compile_mode in ("pmap", "shard_map"):
    cfg = _train_config("dnr_g", compile=compile_mode)
    runner = runner_lib.Runner(cfg, devices)
    state = runner.put_state(step_lib.create_state(cfg, example, jax.random.PRNGKey(0)))
    state, m = runner.train(state, _arrays(), "model")
    results[compile_mode] = (runner.get_state(state), jax.device_get(m))
  (s1, m1), (s2, m2) = results["pmap"], results["shard_map"]
  chex.assert_trees_all_close(s1.reranker.params, s2.reranker.params, atol=1e-5)
  chex.assert_trees_all_close(s1.generator.params, s2.generator.params, atol=1e-5)
  chex.assert_trees_all_close(m1, m2, atol=1e-5)
  assert np.isfinite(m2["l_adv"]) and np.isfinite(m2["l_x"])
  for phase in ("heuristic", "direct"):
    state, m = runner.train(state, _arrays(16), phase)
    assert np.isfinite(m["l_theta"]), phase
    assert ("l_z" in m) == (phase == "heuristic"), phase
  assert int(runner.get_state(state).step) == 3


def test_config_checks_the_window():
  with pytest.raises(ValueError, match="model.pier_window=0"):
    config_lib.validate(_train_config("c_score", model=dataclasses.replace(
        _train_config("c_score").model, pier_window=0)))


@pytest.mark.parametrize("fields, message", [
    (dict(backbone="prm", fpsm_permutations=8), "needs model.backbone='pier'"),
    (dict(fpsm_permutations=1), "fpsm_permutations=1 must be >= 2"),
    (dict(fpsm_permutations=4, fpsm_top_k=5), "fpsm_top_k=5"),
])
def test_config_checks_fpsm(fields, message):
  cfg = _train_config("c_score")
  with pytest.raises(ValueError, match=message):
    config_lib.validate(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **fields)))


@pytest.mark.slow
def test_fpsm_evaluation_end_to_end():
  # A table row with FPSM ranking: its test metrics are those of the searched
  # permutations of the trained model's lists.
  cfg = _train_config("c_score", num_epochs=1, eval_shuffled_scores=False)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, fpsm_permutations=4, fpsm_top_k=2))
  result = train_lib.train_and_evaluate(cfg, DATA, devices=tuple(jax.devices()[:2]))
  test = pipeline.complete(DATA.splits["test"])
  model = train_lib.with_data_vocab(cfg, DATA).model
  logits = train_lib.ranked_logits(pier.fpsm_ranking(model),
                                   result["final_state"].reranker.params, test, 16)
  per_list = metrics_lib.list_metrics(logits, jnp.asarray(test["labels"]),
                                      jnp.asarray(test["mask"]), k=cfg.eval_k,
                                      map_normaliser=cfg.map_normaliser)
  expect = metrics_lib.means(metrics_lib.weighted_sums(per_list))
  assert result["test"]["ndcg"] == pytest.approx(float(expect["ndcg"]), abs=1e-6)
