"""End-to-end tests of the real training loop on synthetic planted-preference lists."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from dnr_jax import config as config_lib
from dnr_jax import synthetic
from dnr_jax import train

DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=150, num_items=120, list_size=20, history_size=10,
    num_lists=(3072, 512, 512), retriever_noise=1.5, seed=0))


def _config(method, **kw):
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=32, num_heads=2, dropout=0.1),
      noise=config_lib.NoiseConfig(generator_hidden=16),
      warmup_epochs=3, num_epochs=6, global_batch_size=64, eval_batch_size=512,
      learning_rate=1e-2, weight_decay=0.0, log_every_steps=0)
  return dataclasses.replace(config_lib.apply_method(cfg, method), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["c_score", "dnr_g"])
def test_training_learns_and_beats_the_retriever(method, tmp_path):
  devices = tuple(jax.devices()[:2])
  result = train.train_and_evaluate(_config(method), DATA, str(tmp_path),
                                    devices=devices)
  hist = result["history"]
  assert hist[-1]["train"]["l_direct"] < hist[0]["train"]["l_direct"] - 0.02
  if method == "dnr_g":
    assert [r["phase"] for r in hist] == ["heuristic"] * 3 + ["model"] * 3
    # Within the heuristic phase the denoising loss falls; the model phase's scores
    # are adversarial, so its L_z is not comparable with the heuristic one.
    assert hist[2]["train"]["l_z"] < hist[0]["train"]["l_z"]
    assert np.isfinite(hist[-1]["train"]["l_x"])
  # The planted preferences are learnable from ids and histories; the retriever's
  # error is not. A clear margin over the retriever's own ranking on held-out lists:
  ndcg, retriever = result["test"]["ndcg"], result["retriever"]["ndcg"]
  assert ndcg > retriever + 0.03, (ndcg, retriever)
  assert 0 < result["test"]["ndcg_shuffled_scores"] <= 1
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(tmp_path):
  devices = tuple(jax.devices()[:1])
  small = dataclasses.replace(DATA, splits={
      k: {f: v[:256] for f, v in split.items()} for k, split in DATA.splits.items()})
  cfg = _config("dnr_b", num_epochs=2, warmup_epochs=1)
  first = train.train_and_evaluate(cfg, small, str(tmp_path), devices=devices)
  resumed = train.train_and_evaluate(dataclasses.replace(cfg, num_epochs=3), small,
                                     str(tmp_path), devices=devices)
  assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
  assert resumed["history"][:2] == first["history"]
  steps_per_epoch = 256 // 64
  assert int(resumed["final_state"].step) == 3 * steps_per_epoch
  # The generator kept training after the resume (phase "model" from epoch 2 on).
  assert resumed["history"][2]["phase"] == "model"


def test_bad_batch_size_fails_before_training():
  with pytest.raises(ValueError, match="global_batch_size=100 is not divisible"):
    train.train_and_evaluate(_config("c_score", global_batch_size=100), DATA, None,
                             devices=tuple(jax.devices()[:8]))


@pytest.mark.slow
def test_early_stopping_selects_the_best_epoch_and_survives_a_restart(tmp_path):
  devices = tuple(jax.devices()[:1])
  small = dataclasses.replace(DATA, splits={
      k: {f: v[:256] for f, v in split.items()} for k, split in DATA.splits.items()})
  steps = 256 // 64
  # A min_delta no real gain reaches: every epoch after the first is "stale", so the
  # run stops after 1 + patience = 3 epochs, whatever the metric does.
  cfg = _config("c_score", num_epochs=8, early_stopping_patience=2,
                early_stopping_min_delta=0.5)
  straight = train.train_and_evaluate(cfg, small, str(tmp_path / "a"), devices=devices)
  assert [r["epoch"] for r in straight["history"]] == [1, 2, 3]
  assert straight["stop_reason"].startswith("early stop after epoch 3")
  assert not straight["under_trained"]
  best = straight["best_epoch"]
  valid = [r["valid"]["ndcg"] for r in straight["history"]]
  assert best == 1 + int(np.argmax(valid))
  assert straight["test"] == straight["history"][best - 1]["test"]
  # The reported state is the selected epoch's, not the last one's.
  assert int(straight["best_state"].step) == best * steps
  assert int(straight["final_state"].step) == 3 * steps

  # The same run interrupted after 2 epochs (its maximum then) and resumed with the
  # full budget: the stopping state comes back from the checkpoint's history.
  cut = train.train_and_evaluate(dataclasses.replace(cfg, num_epochs=2), small,
                                 str(tmp_path / "b"), devices=devices)
  assert cut["stop_reason"].startswith("reached the maximum of 2 epochs")
  resumed = train.train_and_evaluate(cfg, small, str(tmp_path / "b"), devices=devices)
  valid_of = lambda result: [r["valid"]["ndcg"] for r in result["history"]]
  np.testing.assert_allclose(valid_of(resumed), valid, rtol=1e-5)
  assert resumed["best_epoch"] == best and resumed["stop_reason"] == straight[
      "stop_reason"]
  assert int(resumed["best_state"].step) == best * steps
  np.testing.assert_array_equal(
      jax.tree.leaves(resumed["best_state"].reranker.params)[0],
      jax.tree.leaves(straight["best_state"].reranker.params)[0])
  # A stopped run stays stopped: restarting it trains nothing more.
  again = train.train_and_evaluate(cfg, small, str(tmp_path / "b"), devices=devices)
  assert again["history"] == resumed["history"]
  assert int(again["final_state"].step) == 3 * steps
