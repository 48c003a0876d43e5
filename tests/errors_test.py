"""User errors: each one a ConfigError / DataError / ... naming the place, and the
binaries print it as one line with a non-zero exit status (``cli.run_main``)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax.protocol import experiment
from dnr_jax.data import lists, preprocess, types
from experiments import cli, train_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = config_lib.TrainConfig()


def _exp(**kw):
  return experiment.ExperimentConfig(base=BASE, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(seeds=(0, 0)), "seeds [0, 0] repeat [0]: each value is one run (a repeat "
     "would count the same run twice)"),
    (dict(seeds=(0, 1, 2, 1)), "seeds [0, 1, 2, 1] repeat [1]"),
    (dict(backbones=("prm", "setrank", "prm")), "backbones ['prm', 'setrank', 'prm'] "
     "repeat ['prm']"),
    (dict(methods=("c_score", "c_score")), "methods ['c_score', 'c_score'] repeat"),
    (dict(sweeps=(("noise.lambda_c", ("0.1", "0.1")),)),
     "the sweep of 'noise.lambda_c' repeats a value: ['0.1', '0.1']"),
])
def test_repeated_runs_are_rejected(kw, message):
  with pytest.raises(errors.ConfigError) as e:
    experiment.validate(_exp(**kw))
  assert message in str(e.value)


@pytest.mark.parametrize("method, overrides, same", [
    ("dnr_g", (("loss.lambda_m", 0.0),), "c_score"),
    ("dnr_b", (("loss.lambda_m", 0.0),), "c_score"),
    ("heuristic_g", (("loss.lambda_m", 0.0),), "c_score"),
    ("heuristic_b+model.score_usage=add+loss.lambda_m=0", (), "add_score"),
    ("dnr_g_no_adv+model.score_usage=none", (("loss.lambda_m", 0.0),), "backbone"),
])
def test_a_method_that_is_another_method_is_rejected(method, overrides, same):
  with pytest.raises(errors.ConfigError) as e:
    experiment.validate(_exp(methods=(method,), overrides=overrides))
  base = method.split("+")[0]
  assert str(e.value) == (
      f"method={base} with loss.lambda_m=0 is {same}: L_z gets no weight, so no "
      f"generated score is ever used; run {same} instead, or set lambda_m > 0")


def test_lambda_m_zero_is_fine_for_the_baselines_and_a_sweep_stops_at_it():
  experiment.validate(_exp(methods=("backbone", "c_score", "w_score"),
                           overrides=(("loss.lambda_m", 0.0),)))
  with pytest.raises(errors.ConfigError, match="is c_score"):
    experiment.validate(_exp(sweeps=(("loss.lambda_m", ("0", "0.4")),)))


def test_user_errors_of_the_library_are_dnr_errors():
  # ConfigError is a ValueError, so older ``except ValueError`` code still works.
  with pytest.raises(errors.ConfigError):
    config_lib.validate(config_lib.TrainConfig(num_epochs=0))
  with pytest.raises(errors.ConfigError, match="lists.protocol='cascade'"):
    lists.ListConfig(protocol="cascade").validate()
  with pytest.raises(errors.ConfigError, match="unknown config field 'loss.lambda_q'"):
    config_lib.with_overrides(BASE, {"loss.lambda_q": 1.0})
  assert issubclass(errors.ConfigError, ValueError)
  assert issubclass(errors.DataError, errors.DNRError)


def _log(users, items, times):
  n = len(users)
  return types.Interactions(
      user=np.asarray(users, np.int32), item=np.asarray(items, np.int32),
      time=np.asarray(times, np.int64), label=np.ones(n, np.int8), columns={},
      user_raw_id=np.arange(max(users) + 1), item_raw_id=np.arange(max(items) + 1),
      user_features=np.zeros((max(users) + 1, 1), np.int32),
      item_features=np.zeros((max(items) + 1, 1), np.int32), name="tiny")


def test_data_too_small_is_a_data_error():
  log = _log([1, 2, 2], [1, 1, 2], [0, 1, 2])
  with pytest.raises(errors.DataError, match="no interaction survives the 5-core "
                     "filter of 'tiny'"):
    preprocess.k_core(log, 5)
  with pytest.raises(errors.DataError, match="only 2 lists: too few"):
    lists.time_splits(0, np.array([1, 2]), lists.ListConfig())


# ---- the binaries' wrapper, in-process -------------------------------------------------


def _run(main, capsys, argv=("prog",)):
  with pytest.raises(SystemExit) as e:
    cli.one_line_errors(main)(list(argv))
  err = capsys.readouterr().err
  return e.value.code, err


def _raises(error):
  def main(argv):
    del argv
    raise error
  return main


@pytest.mark.parametrize("error, code", [
    (errors.ConfigError("--lambda_c=1.5: noise.lambda_c=1.5 must be in [0, 1]"), 2),
    (errors.DataError("/d/ratings.dat: line 7, column 'rating': value 9 out of "
                          "range [1, 5]"), 3),
    (errors.CheckpointError("/w/runs/prm/dnr_g/seed0/checkpoints/4: damaged"), 4),
    (errors.TrainingDiverged("epoch 2, step 17: the loss is NaN"), 5),
    (errors.Interrupted("training stopped by SIGTERM at epoch 2 step 2/4"), 75),
    (errors.DNRError("anything else the user can fix"), 1),
    (flags.IllegalFlagValueError("flag --seeds=x: not a list"), 2),
    (app.UsageError("unexpected arguments: ['x']"), 2),
])
def test_user_errors_are_one_line_and_exit_non_zero(error, code, capsys, monkeypatch):
  monkeypatch.delenv("DNR_TRACEBACK", raising=False)
  got, err = _run(_raises(error), capsys)
  assert got == code
  assert err == f"{type(error).__name__}: {error}\n"


def test_a_multi_line_message_is_joined_into_one_line(capsys, monkeypatch):
  monkeypatch.delenv("DNR_TRACEBACK", raising=False)
  _, err = _run(_raises(errors.DNRError("first\n  second\n")), capsys)
  assert err == "DNRError: first; second\n"


def test_bugs_keep_their_traceback():
  with pytest.raises(ZeroDivisionError):
    cli.one_line_errors(lambda argv: 1 / 0)(["prog"])


def test_dnr_traceback_shows_the_traceback(monkeypatch):
  monkeypatch.setenv("DNR_TRACEBACK", "1")
  with pytest.raises(errors.ConfigError):
    cli.one_line_errors(_raises(errors.ConfigError("x")))(["prog"])


def test_flag_parse_errors_are_one_line(capsys, monkeypatch):
  monkeypatch.delenv("DNR_TRACEBACK", raising=False)
  with flagsaver.flagsaver():
    with pytest.raises(SystemExit) as e:
      cli.parse_flags(["prog", "--no_such_flag=1"])
  assert e.value.code == 2
  assert capsys.readouterr().err == ("UnrecognizedFlagError: Unknown command line "
                                     "flag 'no_such_flag'\n")


@pytest.mark.parametrize("argv, message", [
    (["--seeds=0,0"], "ConfigError: seeds [0, 0] repeat [0]"),
    (["--seeds=1,a"], "ConfigError: --seeds=1,a must be integers"),
    (["--sweep=lambda_c"], "ConfigError: --sweep='lambda_c' must be FIELD=V1,V2,..."),
    (["--methods=dnr_g", "--lambda_m=0"], "ConfigError: method=dnr_g with "
     "loss.lambda_m=0 is c_score"),
    (["--methods=dnr_g", "--warmup_epochs=12", "--num_epochs=12"],
     "ConfigError: method=dnr_g with warmup_epochs=12 >= num_epochs=12"),
])
def test_flags_to_experiment_errors(argv, message, capsys, monkeypatch):
  monkeypatch.delenv("DNR_TRACEBACK", raising=False)
  with flagsaver.flagsaver():
    cli.parse_flags(["prog", *argv])
    code, err = _run(lambda a: train_flags.experiment_from_flags(), capsys)
  assert code == 2
  assert err.startswith(message) and err.count("\n") == 1


def test_unwritable_workdir_is_found_before_any_work(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  for create in (True, False):
    with pytest.raises(errors.ConfigError) as e:
      cli.check_workdir(str(blocker / "out"), create=create)
    assert str(e.value).startswith(f"--workdir={blocker / 'out'}: cannot write there")
  with pytest.raises(errors.ConfigError, match="--data_dir="):
    cli.check_workdir(str(blocker), flag="--data_dir")
  cli.check_workdir(str(tmp_path / "new" / "deep"), create=False)
  assert not (tmp_path / "new").exists()          # --check_flags creates nothing
  cli.check_workdir(str(tmp_path / "new" / "deep"))
  assert (tmp_path / "new" / "deep").is_dir()


# ---- the binaries, as users run them -----------------------------------------------------


def _binary(module, *flags_, traceback=False, timeout=180):
  env = {k: v for k, v in os.environ.items() if k != "DNR_TRACEBACK"}
  env.update(JAX_PLATFORMS="cpu", **({"DNR_TRACEBACK": "1"} if traceback else {}))
  return subprocess.run([sys.executable, "-m", module, *flags_], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_synthetic_binary_prints_one_line_and_env_shows_the_traceback(tmp_path):
  proc = _binary("experiments.synthetic", f"--workdir={tmp_path}", "--seeds=3,3")
  assert proc.returncode == 2
  assert proc.stderr.splitlines()[-1] == (
      "ConfigError: seeds [3, 3] repeat [3]: each value is one run (a repeat would "
      "count the same run twice)")
  assert "Traceback" not in proc.stderr
  proc = _binary("experiments.synthetic", f"--workdir={tmp_path}", "--seeds=3,3",
                 traceback=True)
  assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


def test_kuairand_binary_checks_the_workdir_before_preparing_data(tmp_path):
  (tmp_path / "file").write_text("")
  proc = _binary("experiments.kuairand", "--flagfile=experiments/configs/demo.flags",
                 f"--workdir={tmp_path / 'file' / 'out'}",
                 f"--data_dir={tmp_path / 'd'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1].startswith(
      f"ConfigError: --workdir={tmp_path / 'file' / 'out'}: cannot write there")
  assert not (tmp_path / "d").exists()


def test_movielens_binary_names_a_cut_off_ratings_file(tmp_path):
  from dnr_jax.data import samples  # pylint: disable=g-import-not-at-top
  folder = samples.write_movielens(str(tmp_path / "src"), samples.SampleConfig(
      num_users=30, num_items=40, rows_per_user=20), "1m")
  ratings = os.path.join(folder, "ratings.dat")
  with open(ratings, "rb+") as f:
    f.truncate(os.path.getsize(ratings) - 4)
  proc = _binary("experiments.movielens", "--variant=1m",
                 f"--source_dir={tmp_path / 'src'}", f"--data_dir={tmp_path / 'd'}",
                 f"--workdir={tmp_path / 'out'}", "--methods=c_score", timeout=300)
  assert proc.returncode == 3, proc.stderr[-2000:]
  last = proc.stderr.splitlines()[-1]
  assert last.startswith(f"DataError: {ratings}: line ") and "the last line has no " \
      "line end" in last
  assert "Traceback" not in proc.stderr
