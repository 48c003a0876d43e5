"""The experiment binaries, run as users run them: ``python -m experiments.X``."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *flags, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("DNR_TEST_COMPILE_CACHE", ""))
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_synthetic_binary_end_to_end(tmp_path):
  proc = _run("experiments.synthetic", f"--workdir={tmp_path}", "--train_lists=192",
              "--methods=c_score,dnr_g", "--num_epochs=2", "--warmup_epochs=1",
              "--batch_size=32", "--hidden=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "NOT the real data" in proc.stderr          # the log says so
  assert "| prm | dnr_g |" in proc.stdout            # the table is printed
  for name in ("results.md", "results.csv", "plots/noise_density.png",
               "runs/prm/c_score/seed0/metrics.jsonl"):
    assert (tmp_path / name).exists(), name


@pytest.mark.parametrize("flag, message", [
    ("--methods=dnr", "unknown method 'dnr'"),
    ("--sweep=loss.lambda_q=0.1,0.2", "unknown config field 'loss.lambda_q'"),
    ("--lambda_c=1.5", "noise.lambda_c=1.5 must be in [0, 1]"),
    ("--seeds=a", "--seeds=a must be integers"),
])
def test_bad_flags_fail_at_once(tmp_path, flag, message):
  proc = _run("experiments.synthetic", f"--workdir={tmp_path}", flag, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not (tmp_path / "runs").exists()   # failed before any training
