"""The trained reranker bundle, batch scoring, ranks and the jax.export artifact."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import metrics as metrics_lib
from dnr_jax.runtime import pipeline
from dnr_jax import serving
from dnr_jax.serving import export
from dnr_jax.runtime import runner as runner_lib
from dnr_jax import synthetic
from dnr_jax import train

N, H = 10, 5
DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=40, num_items=50, list_size=N, history_size=H,
    num_lists=(128, 64, 72), seed=0))
DEVICES = tuple(jax.devices()[:2])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny trained run (c score, 2 epochs) with its workdir."""
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = config_lib.apply_method(config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=16, num_heads=2, dropout=0.1),
      num_epochs=2, global_batch_size=32, eval_batch_size=32, learning_rate=1e-2,
      log_every_steps=0, eval_shuffled_scores=False), "c_score")
  result = train.train_and_evaluate(cfg, DATA, workdir, devices=DEVICES)
  bundle = serving.Bundle.from_result(result, list_size=N, history_size=H)
  return types.SimpleNamespace(workdir=workdir, result=result, bundle=bundle)


def _placed_state(runner, params):
  # train.evaluate reads only state.reranker.params.
  return types.SimpleNamespace(reranker=types.SimpleNamespace(
      params=runner.put_state(params)))


def test_best_params_are_the_selected_epoch(run):
  """Re-evaluating result["best_params"] on the valid lists gives the selected metrics."""
  result = run.result
  cfg = config_lib.from_dict(result["config"])
  runner = runner_lib.Runner(cfg, DEVICES)
  valid = pipeline.complete(DATA.splits["valid"])
  again = train.evaluate(runner, _placed_state(runner, result["best_params"]), valid,
                         cfg.eval_batch_size, num_items=DATA.num_items)
  assert again["ndcg"] == result["valid"]["ndcg"]


def test_bundle_round_trip_and_lookup(run, tmp_path):
  vocab = tmp_path / "vocab"
  vocab.mkdir()
  (vocab / "items.json").write_text('["a", "b"]')
  bundle = dataclasses.replace(run.bundle, vocabulary_dir=str(vocab),
                               data_config={"list_size": N})
  run_dir = tmp_path / "runs" / "prm" / "c_score" / "seed0"
  serving.save_bundle(str(run_dir / serving.RUN_BUNDLE), bundle)
  for path in (run_dir / "bundle", run_dir, tmp_path):   # bundle, run, workdir
    loaded = serving.load_bundle(str(path))
    assert loaded.config == run.bundle.config
    assert isinstance(loaded.config.model.user_feature_vocab, tuple)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, run.bundle.params)
    assert loaded.meta["best_epoch"] == run.result["best_epoch"]
    assert loaded.meta["list_size"] == N and loaded.data_config == {"list_size": N}
    assert (open(os.path.join(loaded.vocabulary_dir, "items.json")).read()
            == '["a", "b"]')
  serving.save_bundle(str(tmp_path / "runs" / "prm" / "dnr_g" / "seed0" / "bundle"),
                      bundle)
  with pytest.raises(errors.CheckpointError, match="holds 2 runs; name one"):
    serving.load_bundle(str(tmp_path))
  with pytest.raises(errors.CheckpointError, match="no such file"):
    serving.load_bundle(str(tmp_path / "missing"))
  with pytest.raises(errors.CheckpointError, match="no trained reranker bundle"):
    serving.load_bundle(str(vocab))
  with pytest.raises(errors.ConfigError, match="unknown config fields.*'shiny'"):
    config_lib.from_dict({**config_lib.to_dict(bundle.config), "shiny": 1})


def test_scores_are_identical_to_the_training_eval_logits(run):
  """The served logits are the ones train.py's Runner evaluated, bit for bit."""
  result = run.result
  cfg = config_lib.from_dict(result["config"])
  runner = runner_lib.Runner(cfg, DEVICES)
  state = _placed_state(runner, result["best_params"])
  test = pipeline.complete(DATA.splits["test"])
  expected = np.concatenate([
      np.asarray(runner.evaluate(state, b)[1])
      for b in pipeline.batches(test, cfg.eval_batch_size, shuffle=False)])[:72]
  logits = serving.score_lists(run.bundle, test, devices=DEVICES)
  assert logits.shape == (72, N)
  np.testing.assert_array_equal(logits, expected)
  # And the metrics accumulated over two chunks are the training eval's.
  scorer = serving.Scorer(run.bundle, devices=DEVICES)
  accumulators = {row: metrics_lib.Accumulator(
      k=cfg.eval_k, map_normaliser=cfg.map_normaliser, num_items=DATA.num_items,
      batch_size=16) for row in ("reranker", "upstream")}
  for part in (slice(0, 40), slice(40, 72)):
    chunk = {k: v[part] for k, v in test.items()}
    lg, sums = scorer.score(chunk)
    accumulators["reranker"].add(lg, chunk["labels"], chunk["mask"], chunk["items"],
                                 sums)
    accumulators["upstream"].add(chunk["scores"], chunk["labels"], chunk["mask"],
                                 chunk["items"])
  got = {row: acc.results() for row, acc in accumulators.items()}
  want = train.evaluate(runner, state, test, cfg.eval_batch_size,
                        num_items=DATA.num_items)
  for key in ("hr", "ndcg", "map", "f1", "auc", "global_auc", "coverage"):
    np.testing.assert_allclose(got["reranker"][key], want[key], rtol=1e-6, err_msg=key)
  upstream = train.evaluate_retriever(test, k=cfg.eval_k,
                                      map_normaliser=cfg.map_normaliser,
                                      num_items=DATA.num_items)
  for key in ("hr", "ndcg", "map", "f1", "auc", "global_auc", "coverage"):
    np.testing.assert_allclose(got["upstream"][key], upstream[key], rtol=1e-6,
                               err_msg=key)


def test_rerank_orders_by_logit_ties_by_position():
  logits = np.array([[0.1, 0.9, 0.5, 0.9, 7.0], [3.0, 1.0, 2.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  ranks = serving.rerank(logits, mask)
  np.testing.assert_array_equal(ranks, [[4, 1, 3, 2, 0], [1, 3, 2, 0, 0]])
  # The metrics' own order, on random lists.
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, (50, 8)).astype(np.float32)   # many ties
  mask = np.arange(8) < rng.integers(1, 9, 50)[:, None]
  ranks = serving.rerank(logits, mask)
  order = np.asarray(metrics_lib.rank_order(logits, mask))
  for i in range(50):
    valid = mask[i].sum()
    np.testing.assert_array_equal(np.argsort(np.where(mask[i], ranks[i], 99))[:valid],
                                  order[i, :valid])


def _export(run, tmp_path):
  directory = str(tmp_path / "export")
  signature = serving.export_reranker(run.bundle, directory)
  return directory, signature


def test_export_round_trip_two_batch_sizes(run, tmp_path):
  from dnr_jax.serving import exported  # pylint: disable=g-import-not-at-top
  directory, signature = _export(run, tmp_path)
  assert "cpu" in signature["platforms"]
  assert [i["name"] for i in signature["inputs"]] == list(export.EXPORT_INPUTS)
  items = next(i for i in signature["inputs"] if i["name"] == "items")
  assert items["shape"] == ["b", N] and items["dtype"] == "int32"
  reranker = exported.load_exported(directory)
  scorer = serving.Scorer(run.bundle, devices=DEVICES)
  for b in (3, 17):
    arrays = serving.example_arrays(run.bundle.config, b, N, H, seed=b)
    np.testing.assert_allclose(reranker(arrays), scorer.score(arrays)[0],
                               rtol=1e-5, atol=1e-5)


def test_exported_reranker_loads_without_the_model_code(run, tmp_path):
  directory, _ = _export(run, tmp_path)
  arrays = serving.example_arrays(run.bundle.config, 5, N, H, seed=1)
  np.savez(tmp_path / "in.npz", **arrays)
  script = f"""
import sys, numpy as np
from dnr_jax.serving import exported
reranker = exported.load_exported({directory!r})
arrays = dict(np.load({str(tmp_path / "in.npz")!r}))
np.save({str(tmp_path / "out.npy")!r}, reranker(arrays))
loaded = [m for m in ("dnr_jax.models", "dnr_jax.step", "flax") if m in sys.modules]
assert not loaded, loaded
print("OK")
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=env, timeout=300, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
  expected = serving.Scorer(run.bundle, devices=DEVICES).score(arrays)[0]
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5,
                             atol=1e-5)
  sig = json.load(open(os.path.join(directory, "signature.json")))
  assert sig["output"]["shape"] == ["b", N]
