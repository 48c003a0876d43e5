"""Whole runs with row-sharded tables: resume after a kill, and serving their bundle.

conftest.py gives this process 8 fake CPU devices; the runs use 4 of them as a
2 x 2 ``('batch', 'model')`` mesh.
"""

import dataclasses
import os
import signal

import jax
import numpy as np
import pytest

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import serving
from dnr_jax import synthetic
from dnr_jax import train
from dnr_jax.runtime import runner as runner_lib
from dnr_jax.serving import exported
from dnr_jax.serving import rerank_files
import tiny_runs

DEVICES = tuple(jax.devices()[:4])
DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=29, num_items=41, list_size=8, history_size=4, num_lists=(128, 32, 32)))
# DNR-G, 3 epochs of 4 steps, a checkpoint every 2 epochs: both players, both
# phases (heuristic, then the model generator) and the sharded moments restored.
CONFIG = config_lib.apply_method(config_lib.TrainConfig(
    model=config_lib.ModelConfig(hidden=8, num_heads=1, dropout=0.1),
    noise=config_lib.NoiseConfig(generator_hidden=8, generator_noise_dim=2),
    warmup_epochs=1, num_epochs=3, checkpoint_every_epochs=2, global_batch_size=32,
    eval_batch_size=32, learning_rate=1e-2, log_every_steps=0,
    eval_shuffled_scores=False, model_parallel=2), "dnr_g")


class _Killed(Exception):
  pass


def _train(workdir, signal_at_step=0, kill_after_epoch=0, monkeypatch=None):
  if signal_at_step:
    original, count = runner_lib.Runner.train, [0]

    def train_then_signal(self, *a, **k):
      out = original(self, *a, **k)
      count[0] += 1
      if count[0] == signal_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    monkeypatch.setattr(runner_lib.Runner, "train", train_then_signal)

  def on_epoch(record):
    if record["epoch"] == kill_after_epoch:   # after its metrics, before its checkpoint
      raise _Killed()
  try:
    return train.train_and_evaluate(CONFIG, DATA, str(workdir), devices=DEVICES,
                                    on_epoch=on_epoch)
  finally:
    if signal_at_step:
      monkeypatch.setattr(runner_lib.Runner, "train", original)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_a_sharded_run_resumes_bit_identically(tmp_path, monkeypatch):
  ref = _train(tmp_path / "ref")
  run = tmp_path / "run"
  # SIGTERM at epoch 2 step 2: a mid-epoch checkpoint of the sharded state.
  with pytest.raises(errors.Interrupted, match="epoch 2 step 2/4"):
    _train(run, signal_at_step=6, monkeypatch=monkeypatch)
  assert os.path.isdir(run / "checkpoints" / "6")
  # Killed after epoch 2's metrics, before its checkpoint: back to step 6.
  with pytest.raises(_Killed):
    _train(run, kill_after_epoch=2)
  got = _train(run)
  assert [r["epoch"] for r in got["history"]] == [1, 2, 3]
  for key in ("final_state", "best_params"):
    a, b = _leaves(ref[key]), _leaves(got[key])
    assert [x.shape for x in a] == [x.shape for x in b]
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  # The host copies hold the whole, unpadded tables.
  table = got["best_params"]["tokens"]["item_embed"]["embedding"]
  assert table.shape == (DATA.num_items, 8)
  strip = lambda h: [{k: v for k, v in r.items() if k not in ("lists_per_s", "epoch_s")}
                     for r in h]
  assert strip(got["history"]) == strip(ref["history"])


def test_another_model_parallel_does_not_resume_silently(tmp_path):
  cfg = dataclasses.replace(CONFIG, num_epochs=2)
  train.train_and_evaluate(cfg, DATA, str(tmp_path), devices=DEVICES)
  with pytest.raises(errors.CheckpointError, match="model_parallel: 2 -> 1"):
    train.train_and_evaluate(dataclasses.replace(cfg, model_parallel=1, num_epochs=3),
                             DATA, str(tmp_path), devices=DEVICES)


N, H = 10, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_runs.own_lists_run(tmp_path_factory.mktemp("sharded"), N, H, DEVICES,
                                 train_overrides={"model_parallel": 2})


def test_the_bundle_of_a_sharded_run_reranks_and_exports_its_scores(run, tmp_path):
  assert run.bundle.config.model_parallel == 1
  assert run.bundle.meta["trained_model_parallel"] == 2
  sharded = tiny_runs.eval_logits(run, DEVICES, model_parallel=2)
  # Replicated scoring of the same parameters (what rerank, export and the service
  # run) gives the sharded eval's logits: the lookups are exact, the rest is the
  # same program up to the batch split.
  np.testing.assert_allclose(tiny_runs.eval_logits(run, DEVICES), sharded,
                             rtol=1e-5, atol=1e-6)
  out = tmp_path / "out.parquet"
  rerank_files.rerank_file(run.bundle, run.lists, str(out), interactions=run.inter,
                           devices=DEVICES)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pq.read_table(out)
  table = table.filter(table["reranked"]).to_pydict()
  index = {l: i for i, l in enumerate(dict.fromkeys(table["list_id"]))}
  rows = np.array([index[l] for l in table["list_id"]])
  slots = np.array(table["upstream_position"]) - 1
  np.testing.assert_allclose(np.array(table["reranker_score"]), sharded[rows, slots],
                             rtol=1e-5, atol=1e-6)
  serving.export_reranker(run.bundle, str(tmp_path / "export"))
  reranker = exported.load_exported(str(tmp_path / "export"))
  arrays = {k: v[:16] for k, v in run.arrays.items()}
  logits = reranker({k: arrays[k] for k in reranker.input_names})
  mask = arrays["mask"]
  np.testing.assert_allclose(logits[mask], sharded[:16][mask], rtol=1e-5, atol=1e-6)
