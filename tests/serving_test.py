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


@pytest.mark.parametrize("compile_, n_devices", [("shard_map", 1), ("shard_map", 2),
                                                  ("pmap", 2)])
def test_score_params_are_the_eval_logits_to_the_bit(run, compile_, n_devices):
  """Serving's logits-only program (Runner.score_params) gives evaluate_params'
  logits exactly, from host arrays (on one device, copied by the program's own
  dispatch) and from placed batches."""
  cfg = dataclasses.replace(config_lib.from_dict(run.result["config"]),
                            compile=compile_)
  runner = runner_lib.Runner(cfg, DEVICES[:n_devices])
  params = runner.put_state(run.result["best_params"])
  test = pipeline.complete(DATA.splits["test"])
  batch = {k: v[:32] for k, v in test.items()}
  want = np.asarray(runner.evaluate_params(params, runner.put_batch(batch))[1])
  assert want.shape == (32, N)
  for given in (batch, runner.put_batch(batch)):
    np.testing.assert_array_equal(np.asarray(runner.score_params(params, given)), want)


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


@pytest.fixture(scope="module")
def exported_dir(run, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("exported") / "export")
  serving.export_reranker(run.bundle, directory)
  return directory


def test_signature_says_each_inputs_padding_side(exported_dir):
  sig = json.load(open(os.path.join(exported_dir, "signature.json")))
  padding = {i["name"]: i["padding"] for i in sig["inputs"]}
  assert padding["history"] == padding["history_mask"] == "first"
  assert padding["items"] == padding["scores"] == padding["mask"] == "last"
  assert "right-aligned" in next(i["meaning"] for i in sig["inputs"]
                                 if i["name"] == "history")
  model = sig["config"]["model"]
  assert model["num_items"] == DATA.num_items and model["num_users"] == DATA.num_users


def _bad(case, a):
  """Spoils one input of the valid arrays ``a`` in list 1 (3 candidates, 2 history
  items: see the caller)."""
  if case == "item_past_vocabulary":
    a["items"][1, 0] = DATA.num_items
  elif case == "user_past_vocabulary":
    a["user"][1] = DATA.num_users
  elif case == "negative_item":
    a["items"][1, 0] = -3
  elif case == "negative_history":
    a["history"][1, -1] = -1
  elif case == "float_item":
    a["items"] = a["items"].astype(np.float64)
    a["items"][1, 0] = 3.7
  elif case == "huge_item":       # would wrap around in int32
    a["items"] = a["items"].astype(np.int64)
    a["items"][1, 0] = 2 ** 32 + 1
  elif case == "string_items":
    a["items"] = a["items"].astype(str)
  elif case == "nan_score":
    a["scores"][1, 0] = np.nan
  elif case == "inf_score":
    a["scores"][1, 0] = np.inf
  elif case == "score_above_1":
    a["scores"][1, 0] = 1.5
  elif case == "negative_score":
    a["scores"][1, 0] = -0.2
  elif case == "candidate_id_in_padding":
    a["mask"][1, 2] = False              # the last real candidate declared padding
  elif case == "history_id_in_padding":
    a["history_mask"][1] = False
  elif case == "history_padded_last":    # left-aligned: the wrong side
    a["history"][1] = [8, 9, 0, 0, 0]
    a["history_mask"][1] = [True, True, False, False, False]
  elif case == "candidates_padded_first":
    a["items"][1] = np.r_[np.zeros(N - 3), [5, 6, 7]]
    a["scores"][1] = np.r_[np.zeros(N - 3), [0.9, 0.5, 0.2]]
    a["mask"][1] = np.arange(N) >= N - 3
  elif case == "mask_not_boolean":
    a["mask"] = a["mask"].astype(np.int32)
    a["mask"][1, 0] = 2
  return a


# case -> (the input the message names, words of the problem)
BAD_INPUTS = {
    "item_past_vocabulary": ("items", f"id {DATA.num_items} is past the vocabulary "
                                      f"(num_items = {DATA.num_items}"),
    "user_past_vocabulary": ("user", "past the vocabulary (num_users"),
    "negative_item": ("items", "negative id -3"),
    "negative_history": ("history", "negative id -1"),
    "float_item": ("items", "3.7 is not an integer id"),
    "huge_item": ("items", f"id {2 ** 32 + 1} is past the vocabulary"),
    "string_items": ("items", "expected int32 ids (map raw ids through vocabulary/"),
    "nan_score": ("scores", "score nan is not finite"),
    "inf_score": ("scores", "score inf is not finite"),
    "score_above_1": ("scores", "score 1.5 is outside [0, 1]"),
    "negative_score": ("scores", "score -0.2 is outside [0, 1]"),
    "candidate_id_in_padding": ("items", "where 'mask' says padding"),
    "history_id_in_padding": ("history", "where 'history_mask' says padding"),
    "history_padded_last": ("history_mask", "the history is padded FIRST"),
    "candidates_padded_first": ("mask", "candidates are padded LAST"),
    "mask_not_boolean": ("mask", "2 is not a mask value"),
}


def _valid_arrays(reranker, seed):
  arrays = serving.example_arrays(config_lib.from_dict(reranker.signature["config"]),
                                  4, N, H, seed=seed)
  arrays["items"][1] = np.r_[[5, 6, 7], np.zeros(N - 3)]
  arrays["scores"][1] = np.r_[[0.9, 0.5, 0.2], np.zeros(N - 3)]
  arrays["mask"][1] = np.arange(N) < 3
  arrays["history"][1] = [0, 0, 0, 8, 9]
  arrays["history_mask"][1] = [False, False, False, True, True]
  return arrays


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_exported_loader_rejects_a_bad_input_in_one_line(exported_dir, case):
  from dnr_jax.serving import exported  # pylint: disable=g-import-not-at-top
  reranker = exported.load_exported(exported_dir)
  arrays = _valid_arrays(reranker, seed=3)
  assert np.isfinite(reranker(arrays)).all()        # valid as it stands
  name, words = BAD_INPUTS[case]
  with pytest.raises(errors.DataError) as info:
    reranker(_bad(case, arrays))
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "\n" not in message and f"input {name!r} " in message, message
  assert words in message, message


def test_the_raw_exported_call_stays_unchecked(exported_dir):
  from dnr_jax.serving import exported  # pylint: disable=g-import-not-at-top
  reranker = exported.load_exported(exported_dir)
  arrays = _valid_arrays(reranker, seed=4)
  arrays["scores"][1, 0] = np.nan
  args = [np.asarray(arrays[i["name"]], i["dtype"])
          for i in reranker.signature["inputs"]]
  logits = np.asarray(reranker.exported.call(*args))   # no check, no error
  assert logits.shape == (4, N)
