"""The experiment binaries, run as users run them: ``python -m experiments.X``."""

import os
import subprocess
import sys

import pytest
import child_env  # pylint: disable=g-bad-import-order  (tests/child_env.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *flags, timeout=600):
  env = child_env.jax_child_env()
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_synthetic_binary_end_to_end(tmp_path):
  proc = _run("experiments.synthetic", f"--workdir={tmp_path}", "--train_lists=192",
              "--methods=dnr_g", "--num_epochs=2", "--warmup_epochs=1",
              "--batch_size=32", "--hidden=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "NOT the real data" in proc.stderr          # the log says so
  assert "host allocator: reuse" in proc.stderr      # applied before JAX, on CPU
  assert "| prm | dnr_g |" in proc.stdout            # the table is printed
  for name in ("results.md", "results.csv", "plots/noise_density.png",
               "runs/prm/dnr_g/seed0/metrics.jsonl"):
    assert (tmp_path / name).exists(), name


@pytest.mark.parametrize("flag, message", [
    ("--methods=dnr", "unknown method 'dnr'"),
    ("--sweep=loss.lambda_q=0.1,0.2", "unknown config field 'loss.lambda_q'"),
    ("--lambda_c=1.5", "noise.lambda_c=1.5 must be in [0, 1]"),
    ("--seeds=a", "--seeds=a must be integers"),
    ("--warmup_epochs=6", "warmup_epochs=6 >= num_epochs=6"),   # dnr_g: no generator
])
def test_bad_flags_fail_at_once(tmp_path, flag, message):
  proc = _run("experiments.synthetic", f"--workdir={tmp_path}", flag, timeout=120)
  assert proc.returncode == 2                         # a user error: one line
  assert message in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
  assert not (tmp_path / "runs").exists()   # failed before any training


_TINY_DATA = ("--sample_users=60", "--sample_items=50", "--sample_rows_per_user=50",
              "--k_core=5", "--list_size=10", "--history_size=8", "--retriever_dim=8",
              "--retriever_epochs=2")
# One epoch of DNR's model phase (both players): these tests are of the data sets'
# paths; the synthetic binary's runs through the warm-up phase into the model phase.
_TINY_MODEL = ("--methods=dnr_g", "--num_epochs=1", "--warmup_epochs=0",
               "--batch_size=32", "--hidden=16", "--num_heads=2", "--plots=false")


@pytest.mark.slow
def test_kuairand_binary_on_the_embedded_sample(tmp_path):
  proc = _run("experiments.kuairand", "--flagfile=experiments/configs/demo.flags",
              f"--workdir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}",
              *_TINY_DATA, *_TINY_MODEL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "GENERATED sample, NOT the real data" in proc.stderr
  assert "raw retriever score AUC" in proc.stderr     # the preparation report
  assert "| prm | dnr_g |" in proc.stdout
  assert (tmp_path / "out" / "runs/prm/dnr_g/seed0/metrics.jsonl").exists()


@pytest.mark.slow
def test_movielens_binary_on_the_embedded_sample(tmp_path):
  proc = _run("experiments.movielens",
              "--flagfile=experiments/configs/demo_movielens.flags",
              f"--workdir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}",
              "--sample_users=80", "--sample_items=90", "--sample_rows_per_user=40",
              *_TINY_DATA[3:], *_TINY_MODEL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "MovieLens-sample (GENERATED sample, NOT the real data)" in proc.stderr
  assert "retrieval lists" in proc.stderr
  assert "| prm | dnr_g |" in proc.stdout


@pytest.mark.parametrize("module, flag, message", [
    ("experiments.kuairand", "--protocol=cascade", "lists.protocol='cascade'"),
    ("experiments.kuairand", "--eval_k=60", "eval_k=60 exceeds the list size n=50"),
    ("experiments.kuairand", "--variant=10k", "--variant"),
    ("experiments.movielens", "--label=is_watched", "data.label"),
])
def test_data_binaries_reject_bad_flags_before_any_work(tmp_path, module, flag,
                                                        message):
  proc = _run(module, f"--workdir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'd'}",
              flag, timeout=120)
  assert proc.returncode == 2                         # a user error: one line
  assert message in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
  assert not (tmp_path / "d").exists()       # failed before preparing any data


_FLAGFILE_BINARY = {
    "demo": "kuairand", "kuairand_pure": "kuairand", "kuairand_1k": "kuairand",
    "investigation_kuairand": "kuairand", "demo_movielens": "movielens",
    "movielens_1m": "movielens", "movielens_100k": "movielens",
    "investigation_movielens": "movielens", "investigation_synthetic": "synthetic",
    "investigation_rows": "kuairand", "lists_example": "lists",
    "amazon_books": "amazon_books", "demo_amazon_books": "amazon_books",
}


def test_every_flagfile_has_a_binary():
  names = {f[:-len(".flags")] for f in os.listdir(os.path.join(ROOT, "experiments",
                                                               "configs"))
           if f.endswith(".flags")}
  assert names == set(_FLAGFILE_BINARY), "map new flagfiles to their binary here"


@pytest.mark.parametrize("name", sorted(_FLAGFILE_BINARY))
def test_shipped_flagfiles_are_valid(tmp_path, name):
  # The paper experiments run for hours on accelerators: a typo in their flagfiles
  # must fail here, not in the batch job. --check_flags validates without data.
  binary = _FLAGFILE_BINARY[name]
  data = [] if binary == "synthetic" else [f"--data_dir={tmp_path / 'd'}"]
  proc = _run(f"experiments.{binary}", f"--flagfile=experiments/configs/{name}.flags",
              "--check_flags", *data, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "flags OK:" in proc.stdout
  assert not (tmp_path / "d").exists()


def test_check_flags_still_rejects_bad_values(tmp_path):
  proc = _run("experiments.kuairand", "--flagfile=experiments/configs/demo.flags",
              "--check_flags", "--lambda_m=-1", timeout=120)
  assert proc.returncode != 0
  assert "lambda_m" in proc.stderr


def test_synthetic_binary_never_imports_tfds(tmp_path):
  # TFDS costs seconds at start-up and only the data-set binaries need it.
  script = ("import runpy, sys\n"
            f"sys.argv = ['synthetic', '--check_flags', '--workdir={tmp_path}']\n"
            "try:\n"
            "  runpy.run_module('experiments.synthetic', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "  assert not e.code, e.code\n"
            "print('tfds loaded:', 'tensorflow_datasets' in sys.modules)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "flags OK:" in proc.stdout and "tfds loaded: False" in proc.stdout


def test_rerank_binary_defines_no_training_flag():
  proc = _run("experiments.rerank", "--helpfull", timeout=120)
  listed = proc.stdout + proc.stderr
  assert "--checkpoint" in listed and "--compilation_cache" in listed
  for flag in ("--methods", "--lambda_m", "--hidden", "--seeds", "--workdir",
               "--variant", "--check_flags", "--distributed"):
    assert flag not in listed, flag
