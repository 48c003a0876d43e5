"""Training lists read from disk (data.list_records, runtime.disk_input): the same
batches as the in-memory pipeline, the same run, and a mid-epoch resume."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import synthetic
from dnr_jax import train
from dnr_jax.data import list_records
from dnr_jax.runtime import disk_input
from dnr_jax.runtime import pipeline
from dnr_jax.runtime import runner as runner_lib

DATA = synthetic.generate(synthetic.SyntheticConfig(
    num_users=29, num_items=41, list_size=8, history_size=4, num_lists=(150, 32, 32)))
TRAIN = pipeline.complete(DATA.splits["train"])
DEVICES = tuple(jax.devices()[:2])


def _write(tmp_path, arrays=TRAIN, chunk=40):
  path = str(tmp_path / "train.lists")
  n = pipeline.num_lists(arrays)
  count = list_records.write_list_records(
      path, ({k: v[i:i + chunk] for k, v in arrays.items()} for i in range(0, n, chunk)))
  assert count == n
  return list_records.ListRecords(path)


def test_records_round_trip_in_any_order(tmp_path):
  rng = np.random.default_rng(0)
  arrays = dict(TRAIN, user_features=rng.integers(1, 9, (150, 2)).astype(np.int32),
                item_features=rng.integers(1, 9, (150, 8, 1)).astype(np.int32))
  records = _write(tmp_path, arrays)
  assert len(records) == 150
  idx = np.array([149, 0, 7, 7, 80])
  got = records.read(idx)
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v[idx], err_msg=k)
  # Zero-wide fields (no feature columns) keep their shape.
  assert _write(tmp_path).read([3])["item_features"].shape == (1, 8, 0)


@pytest.mark.parametrize("process_count", [1, 2])
def test_disk_batches_are_the_in_memory_batches(tmp_path, process_count):
  records = _write(tmp_path)
  for epoch in (0, 3):
    for p in range(process_count):
      where = dict(seed=5, epoch=epoch, process_index=p, process_count=process_count)
      memory = list(pipeline.batches(TRAIN, 32, shuffle=True, pad_last=False, **where))
      disk = list(disk_input.batches(records, 32, **where))
      assert len(disk) == len(memory) == 150 // 32
      for a, b in zip(memory, disk):
        for k in TRAIN:
          np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      # Started mid-epoch: the remaining batches, the same.
      tail = list(disk_input.batches(records, 32, start_step=2, **where))
      assert len(tail) == len(memory) - 2
      np.testing.assert_array_equal(tail[0]["items"], memory[2]["items"])


def test_bad_files_are_named(tmp_path):
  records = _write(tmp_path)
  header = records.path + ".json"
  with open(header) as f:
    meta = json.load(f)
  with open(header, "w") as f:
    json.dump(dict(meta, lists=151), f)
  with pytest.raises(errors.DataError, match="151"):
    list_records.ListRecords(records.path)
  with open(header, "w") as f:
    json.dump(dict(meta, format="something else"), f)
  with pytest.raises(errors.DataError, match="format 'something else'"):
    list_records.ListRecords(records.path)
  with pytest.raises(errors.DataError, match="not a list-records header"):
    list_records.ListRecords(str(tmp_path / "missing"))
  other = dict(TRAIN, items=TRAIN["items"][:, :4])
  with pytest.raises(errors.DataError, match="per-list shapes"):
    list_records.write_list_records(str(tmp_path / "bad"), [TRAIN, other])
  assert not os.path.exists(tmp_path / "bad")


CONFIG = config_lib.apply_method(config_lib.TrainConfig(
    model=config_lib.ModelConfig(hidden=8, num_heads=1, dropout=0.1),
    noise=config_lib.NoiseConfig(generator_hidden=8, generator_noise_dim=2),
    warmup_epochs=1, num_epochs=3, checkpoint_every_epochs=2, global_batch_size=32,
    eval_batch_size=32, learning_rate=1e-2, log_every_steps=0,
    eval_shuffled_scores=False), "dnr_g")


def _on_disk(tmp_path):
  return dataclasses.replace(DATA, splits=dict(DATA.splits, train=_write(tmp_path)))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _strip(history):
  return [{k: v for k, v in r.items() if k not in ("lists_per_s", "epoch_s")}
          for r in history]


@pytest.mark.slow
def test_a_run_from_disk_is_the_run_from_memory_and_resumes_mid_epoch(
    tmp_path, monkeypatch):
  memory = train.train_and_evaluate(CONFIG, DATA, str(tmp_path / "memory"),
                                    devices=DEVICES)
  data = _on_disk(tmp_path)
  run = tmp_path / "disk"
  original, count = runner_lib.Runner.train, [0]

  def train_then_signal(self, *a, **k):
    out = original(self, *a, **k)
    count[0] += 1
    if count[0] == 6:      # epoch 2, step 2 of 4
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  monkeypatch.setattr(runner_lib.Runner, "train", train_then_signal)
  with pytest.raises(errors.Interrupted, match="epoch 2 step 2/4"):
    train.train_and_evaluate(CONFIG, data, str(run), devices=DEVICES)
  monkeypatch.setattr(runner_lib.Runner, "train", original)
  disk = train.train_and_evaluate(CONFIG, data, str(run), devices=DEVICES)
  assert _strip(disk["history"]) == _strip(memory["history"])
  for x, y in zip(_leaves(memory["final_state"]), _leaves(disk["final_state"])):
    np.testing.assert_array_equal(x, y)


class _NeedsTensorFlow:
  """A builder whose preparation fails the way TFDS's writer does when a split
  outgrows its 1 GB buffer and TensorFlow is not installed."""
  data_dir = "/data/dnr_own_lists/own-x/1.0.0"

  def download_and_prepare(self, download_config):
    del download_config
    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")


class _Broken(_NeedsTensorFlow):
  def download_and_prepare(self, download_config):
    raise ModuleNotFoundError("No module named 'somethingelse'", name="somethingelse")


def test_a_split_too_large_without_tensorflow_is_one_line():
  from dnr_jax.data import raw  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.DataError, match=r"more than 1 GB .*\.\[large\]"):
    raw.download_and_prepare(_NeedsTensorFlow(), None)
  with pytest.raises(ModuleNotFoundError, match="somethingelse"):
    raw.download_and_prepare(_Broken(), None)
