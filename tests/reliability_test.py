"""Reliability of training runs: non-finite guard, collapse warning, config-checked
resume, damaged-checkpoint recovery, and preemption (real processes killed).
"""

import dataclasses
import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dnr_jax.runtime import checkpoints
from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax.protocol import experiment
from dnr_jax.protocol import report
from dnr_jax.runtime import guards
from dnr_jax import synthetic
from dnr_jax import train

import child_env  # pylint: disable=g-bad-import-order  (tests/child_env.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = synthetic.SyntheticConfig(num_users=40, num_items=40, list_size=8,
                                  history_size=4, num_lists=(128, 64, 64), seed=0)
DATA = synthetic.generate(SYNTH)
DEVICES = tuple(jax.devices()[:1])


def _config(method="c_score", **kw):
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=8, num_heads=1, dropout=0.1),
      noise=config_lib.NoiseConfig(generator_hidden=8, generator_noise_dim=2),
      warmup_epochs=1, num_epochs=2, global_batch_size=32, eval_batch_size=64,
      learning_rate=1e-2, weight_decay=0.0, log_every_steps=0,
      eval_shuffled_scores=False)
  return dataclasses.replace(config_lib.apply_method(cfg, method), **kw)


def _strict_json(line: str):
  def bad(token):
    raise ValueError(f"bare {token} in JSON")
  return json.loads(line, parse_constant=bad)


def _poisoned(data, list_index: int):
  """``data`` with one training list's scores NaN (a bad row that slipped through)."""
  train_split = {k: np.array(v) for k, v in data.splits["train"].items()}
  train_split["scores"][list_index] = np.nan
  return dataclasses.replace(data, splits=dict(data.splits, train=train_split))


# ---------------------------------------------------------------- non-finite guard


def test_json_lines_never_hold_bare_nan():
  line = guards.dumps({"a": float("nan"), "b": [np.float32(np.inf), 1.5],
                       "c": {"d": np.float32(2.0), "e": np.int64(3)}})
  assert _strict_json(line) == {"a": None, "b": [None, 1.5], "c": {"d": 2.0, "e": 3}}


def test_learning_rate_1e4_stops_naming_epoch_and_step(tmp_path):
  cfg = _config(learning_rate=1e4)
  with pytest.raises(errors.TrainingDiverged,
                     match=r"at epoch 1 step \d+/4: non-finite loss or gradient .*"
                           r"learning rate is likely too high") as e:
    train.train_and_evaluate(cfg, DATA, str(tmp_path), devices=DEVICES)
  assert "\n" not in str(e.value)
  # Nothing non-finite was checkpointed, and no epoch row was written.
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_skip_leaves_out_the_bad_steps_and_counts_them(tmp_path):
  data = _poisoned(DATA, 5)
  result = train.train_and_evaluate(_config(nonfinite="skip"), data, str(tmp_path),
                                    devices=DEVICES)
  # The poisoned list is in exactly one batch of each epoch.
  assert [r["train"]["skipped_steps"] for r in result["history"]] == [1, 1]
  assert all(np.isfinite(r["train"]["l_direct"]) for r in result["history"])
  assert checkpoints.all_finite(result["final_state"])
  rows = [_strict_json(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["train"]["skipped_steps"] for r in rows] == [1, 1]
  # Skipped steps still advance the step counter (and so the randomness).
  assert int(result["final_state"].step) == 2 * 4


def test_stop_names_the_step_of_a_poisoned_batch(tmp_path):
  with pytest.raises(errors.TrainingDiverged, match=r"at epoch 1 step \d/4"):
    train.train_and_evaluate(_config(), _poisoned(DATA, 5), None, devices=DEVICES)


def test_skip_fails_when_every_step_of_an_epoch_is_skipped():
  with pytest.raises(errors.TrainingDiverged, match="every step of the epoch"):
    train.train_and_evaluate(_config(learning_rate=1e4, nonfinite="skip"), DATA, None,
                             devices=DEVICES)


def test_a_checkpoint_with_nan_parameters_is_never_written(tmp_path):
  ck = checkpoints.Checkpoints(str(tmp_path / "ck"), 2, _config())
  with pytest.raises(errors.TrainingDiverged, match="not finite"):
    ck.save(1, {"w": np.array([1.0, np.nan], np.float32)}, {"epoch": 0, "history": []})
  ck.close()
  assert ck.latest() is None and not glob.glob(str(tmp_path / "ck" / "*"))


def test_collapse_to_constant_scores_is_a_warning():
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  constant = np.array([[0.3, 0.3, 0.3, 9.0], [-1.0, -1.0, 5.0, 5.0]])
  assert guards.logit_spread(constant, mask) == 0.0
  assert "collapsed to constant scores" in guards.collapse_warning(
      {"logit_spread": guards.logit_spread(constant, mask)})
  # Blown-up logits that differ only by float32 rounding are constant too.
  huge = np.float32(1e8) + np.array([[0, 8, 0, 0], [8, 16, 0, 0]], np.float32)
  assert "collapsed" in guards.collapse_warning(
      {"logit_spread": guards.logit_spread(huge, mask)})
  spread = np.array([[0.1, 0.5, 0.9, 0.0], [1.0, -1.0, 0.0, 0.0]])
  assert guards.collapse_warning(
      {"logit_spread": guards.logit_spread(spread, mask)}) is None
  assert "not finite" in guards.collapse_warning({"logit_spread": float("nan")})


@pytest.mark.slow
def test_a_collapsed_run_warns_in_its_record(tmp_path):
  result = train.train_and_evaluate(_config(num_epochs=1, learning_rate=100.0), DATA,
                                    str(tmp_path), devices=DEVICES)
  assert "collapsed to constant scores" in result["history"][0]["warnings"][0]
  row = _strict_json((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert row["warnings"] == result["history"][0]["warnings"]


def test_failed_runs_are_failed_rows_and_the_experiment_fails(tmp_path):
  exp = experiment.ExperimentConfig(
      base=_config(num_epochs=1), overrides=(("learning_rate", 1e4),),
      methods=("c_score",), seeds=(0,), plots=False)
  with pytest.raises(errors.TrainingDiverged, match="1 of 1 runs diverged"):
    experiment.run_experiment(exp, DATA, str(tmp_path))
  table = (tmp_path / "results.md").read_text()
  row = [l for l in table.splitlines() if l.startswith("| prm | c_score |")][0]
  assert "FAILED" in row and "diverged" in row and "." not in row.split("|")[3]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["failed"] == ["prm/c_score/seed0"]
  assert saved["runs"][0]["config"]["learning_rate"] == 1e4
  assert saved["experiment"]["methods"] == ["c_score"]
  # By config, the experiment completes (and still marks the row).
  out = experiment.run_experiment(dataclasses.replace(exp, allow_failed_runs=True),
                                  DATA, str(tmp_path / "allowed"))
  assert out["summary"][0]["failed"]


def test_a_collapsed_seed_is_flagged_in_the_table(tmp_path):
  test = {key: 0.5 for key, _ in report.COLUMNS}
  rows = [{"backbone": "prm", "method": "c_score", "seed": s, "test": test,
           "warnings": ["collapsed"] if s == 1 else []} for s in (0, 1)]
  md = report.write_table(report.summarize(rows, 6), 6, str(tmp_path / "r.md"),
                              str(tmp_path / "r.csv"), "t")
  assert "WARNING: scores collapsed or not finite (seed 1)" in md


# ---------------------------------------------------------------- resume checks


def _state(v: float):
  return {"w": np.full((3, 2), v, np.float32), "step": np.array(7, np.int32)}


def test_resume_with_another_config_names_the_fields(tmp_path):
  d = str(tmp_path / "checkpoints")
  old = _config()
  ck = checkpoints.Checkpoints(d, 2, old)
  ck.save(4, _state(1.0), {"epoch": 0, "history": []})
  ck.close()
  new = dataclasses.replace(old, learning_rate=0.02,
                            noise=dataclasses.replace(old.noise, lambda_c=0.5),
                            log_every_steps=10, eval_batch_size=32)
  with pytest.raises(errors.CheckpointError) as e:
    checkpoints.Checkpoints(d, 2, new).restore_latest(_state(0.0))
  msg = str(e.value)
  assert "\n" not in msg
  assert "learning_rate: 0.01 -> 0.02" in msg and "noise.lambda_c: 0.4 -> 0.5" in msg
  # Fields that may change are not reported; the way out is.
  assert "log_every_steps" not in msg and "eval_batch_size" not in msg
  assert "another --workdir" in msg and "--resume=force" in msg
  # force continues; a later num_epochs is fine; fewer than done is refused.
  forced = checkpoints.Checkpoints(d, 2, dataclasses.replace(new, resume="force"))
  state, meta = forced.restore_latest(_state(0.0), num_epochs=5)
  forced.close()
  assert state["w"][0, 0] == 1.0 and meta["epoch"] == 0
  ok = checkpoints.Checkpoints(d, 2, dataclasses.replace(old, num_epochs=9))
  assert ok.restore_latest(_state(0.0), num_epochs=9) is not None
  ok.close()
  with pytest.raises(errors.CheckpointError, match="trained 1 epochs, more than "
                                                   "num_epochs=0"):
    checkpoints.Checkpoints(d, 2, old).restore_latest(_state(0.0), num_epochs=0)
  # never: the old checkpoints are set aside, the run starts fresh.
  fresh = checkpoints.Checkpoints(d, 2, dataclasses.replace(new, resume="never"))
  assert fresh.restore_latest(_state(0.0)) is None
  fresh.close()
  assert glob.glob(d + ".old-*")


def test_a_field_an_older_checkpoint_lacks_counts_as_its_default():
  cfg = _config()
  old = config_lib.to_dict(cfg)
  del old["adversarial_order"]              # written before the field existed
  del old["model"]["compute_dtype"]
  assert checkpoints.config_differences(old, config_lib.to_dict(cfg)) == []
  new = dataclasses.replace(cfg, adversarial_order="simultaneous")
  assert checkpoints.config_differences(old, config_lib.to_dict(new)) == [
      ("adversarial_order", "sequential", "simultaneous")]


@pytest.mark.slow
def test_resume_with_another_hidden_size_is_one_line(tmp_path):
  train.train_and_evaluate(_config(num_epochs=1), DATA, str(tmp_path), devices=DEVICES)
  bigger = _config(num_epochs=1)
  bigger = dataclasses.replace(bigger, model=dataclasses.replace(bigger.model, hidden=16))
  with pytest.raises(errors.CheckpointError, match=r"model.hidden: 8 -> 16"):
    train.train_and_evaluate(bigger, DATA, str(tmp_path), devices=DEVICES)
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert record["epoch"] == 1


# ---------------------------------------------------------------- damaged checkpoints


def _damage(step_dir: str, how: str) -> None:
  if how == "truncated array file":
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                  recursive=True) if os.path.isfile(f)]
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif how == "truncated metadata":
    f = os.path.join(step_dir, "meta", "metadata")
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  else:
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


@pytest.mark.parametrize("how", ["truncated array file", "truncated metadata",
                                 "empty step folder"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(tmp_path, how, caplog):
  d = str(tmp_path / "checkpoints")
  ck = checkpoints.Checkpoints(d, 3, _config())
  ck.save(4, _state(1.0), {"epoch": 0, "history": [{"epoch": 1}]})
  ck.save(8, _state(2.0), {"epoch": 1, "history": [{"epoch": 1}, {"epoch": 2}]})
  ck.close()
  _damage(os.path.join(d, "8"), how)
  ck = checkpoints.Checkpoints(d, 3, _config())
  with caplog.at_level("WARNING"):
    state, meta = ck.restore_latest(_state(0.0))
  assert state["w"][0, 0] == 1.0 and meta["epoch"] == 0
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0] and os.path.join(d, "8") in lines[0]
  assert glob.glob(d + ".damaged/8-*")
  # The run goes on and can write that step again.
  ck.save(8, _state(3.0), {"epoch": 1, "history": []})
  ck.close()
  again = checkpoints.Checkpoints(d, 3, _config())
  assert again.restore_latest(_state(0.0))[0]["w"][0, 0] == 3.0
  again.close()


def test_stale_temporary_folders_are_removed_on_start(tmp_path):
  d = tmp_path / "checkpoints"
  stale = d / "12.orbax-checkpoint-tmp-1764115200"
  (stale / "state").mkdir(parents=True)
  (stale / "state" / "junk").write_text("half a save")
  ck = checkpoints.Checkpoints(str(d), 2, _config())
  assert not stale.exists() and ck.latest() is None
  ck.close()


# ---------------------------------------------------------------- preemption

_CHILD = textwrap.dedent("""
    import os, signal, sys, json
    import numpy as np
    import jax
    from absl import logging
    logging.set_verbosity(logging.INFO)
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    import reliability_test as t
    from dnr_jax import train
    from dnr_jax.runtime import runner as runner_lib
    from dnr_jax.protocol import experiment
    workdir, sig_at_step, sig, kill_at_epoch = sys.argv[1], *map(int, sys.argv[2:])
    if sig_at_step:
      original, count = runner_lib.Runner.train, [0]
      def train_then_signal(self, *a, **k):
        out = original(self, *a, **k)
        count[0] += 1
        if count[0] == sig_at_step:
          os.kill(os.getpid(), sig)
        return out
      runner_lib.Runner.train = train_then_signal
    tb = experiment._TensorBoard(os.path.join(workdir, "tb"))
    def on_epoch(record):
      tb(record)
      if record["epoch"] == kill_at_epoch:   # after metrics.jsonl, before the checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    result = train.train_and_evaluate(t.KILL_CONFIG, t.DATA, workdir,
                                      devices=tuple(jax.devices()[:1]),
                                      on_epoch=on_epoch, on_resume=tb.restart)
    tb.close()
    params = jax.tree.leaves(result["final_state"])
    np.savez(os.path.join(workdir, "final.npz"), *[np.asarray(p) for p in params])
    np.savez(os.path.join(workdir, "best.npz"),
             *[np.asarray(p) for p in jax.tree.leaves(result["best_params"])])
    with open(os.path.join(workdir, "history.json"), "w") as f:
      json.dump(result["history"], f)
""").format(root=ROOT)
# 3 epochs of 4 steps, a checkpoint every 2 epochs; DNR-G, so both players and
# both phases (heuristic, then the model generator) are restored.
KILL_CONFIG = _config("dnr_g", num_epochs=3, warmup_epochs=1, checkpoint_every_epochs=2)
_TIMING = ("lists_per_s", "epoch_s")


def _child(workdir, sig_at_step=0, sig=0, kill_at_epoch=0):
  env = child_env.jax_child_env(-1, PYTHONPATH=ROOT)   # one device
  return subprocess.run([sys.executable, "-c", _CHILD, str(workdir), str(sig_at_step),
                         str(sig), str(kill_at_epoch)], env=env, capture_output=True,
                        text=True, timeout=1200)


def _tb_scalars(logdir):
  """``{tag: [steps]}`` of every scalar in the event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append(event.step)
  return out


def _strip(history):
  return [{k: v for k, v in r.items() if k not in _TIMING} for r in history]


@pytest.mark.slow
def test_killed_and_terminated_runs_end_as_an_uninterrupted_one(tmp_path):
  ref, run = tmp_path / "ref", tmp_path / "run"
  assert _child(ref).returncode == 0
  # SIGKILL mid-epoch 1 (nothing saved yet), then after epoch 1's metrics row
  # (no checkpoint before epoch 2), SIGTERM mid-epoch 2 (a mid-epoch checkpoint),
  # SIGKILL after epoch 2's row (before its checkpoint), then to the end.
  kill = _child(run, sig_at_step=2, sig=signal.SIGKILL)
  assert kill.returncode == -signal.SIGKILL
  assert _child(run, kill_at_epoch=1).returncode == -signal.SIGKILL
  assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
  term = _child(run, sig_at_step=6, sig=signal.SIGTERM)
  assert term.returncode != 0, term.stderr[-2000:]
  assert "Interrupted: training stopped by SIGTERM at epoch 2 step 2/4" in term.stderr
  assert glob.glob(str(run / "checkpoints" / "6"))
  assert _child(run, kill_at_epoch=2).returncode == -signal.SIGKILL
  last = _child(run)
  assert last.returncode == 0, last.stderr[-2000:]
  assert "resumed from" in last.stderr and "at epoch 2 step 2" in last.stderr

  a, b = np.load(ref / "final.npz"), np.load(run / "final.npz")
  assert a.files == b.files
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  # The selected epoch's reranker survived the kills too (serving bundles it).
  a, b = np.load(ref / "best.npz"), np.load(run / "best.npz")
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  h_ref = json.loads((ref / "history.json").read_text())
  h_run = json.loads((run / "history.json").read_text())
  assert _strip(h_run) == _strip(h_ref)
  rows = [_strict_json(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  assert _strip(rows) == _strip([_strict_json(l) for l in
                                 (ref / "metrics.jsonl").read_text().splitlines()])
  tb = _tb_scalars(str(run / "tb"))
  assert tb["valid/ndcg"] == [1, 2, 3] and tb["train/l_direct"] == [1, 2, 3]
