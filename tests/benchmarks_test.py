"""The step benchmark and the GPU check, run as users run them, on tiny shapes.

These check that the benchmarks run and print their fields, not how fast anything is.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks import roofline
import child_env  # pylint: disable=g-bad-import-order  (tests/child_env.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--batch_size=8", "--list_size=6", "--history_size=4", "--hidden=8",
        "--num_heads=2", "--items=30", "--users=10", "--warmup=1", "--repeats=2",
        "--iters=1")
STEP_FIELDS = ("step", "method", "dtype", "platform", "device_kind", "devices",
               "global_batch", "per_device_batch", "lists_per_s", "lists_per_s_min",
               "lists_per_s_max", "step_ms_median", "repeats", "compile_s",
               "flops_per_list", "achieved_flops_per_s", "peak_rss_gb",
               "peak_device_bytes")


def _run(module, *args, env=None, timeout=1800):
  # No host device count: the benchmark asks for its own.
  env = child_env.jax_child_env(-1, PYTHONPATH=ROOT, **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _records(text):
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_step_benchmark_prints_one_json_line_per_step_and_device_count():
  # Two of the four steps (the GPU check's test below runs all four).
  proc = _run("benchmarks.step", *TINY, "--devices=1,2", "--steps=direct,model")
  assert proc.returncode == 0, proc.stderr[-3000:]
  recs = _records(proc.stdout)
  assert [(r["devices"], r["step"]) for r in recs] == [
      (k, s) for k in (1, 2) for s in ("direct", "model")]
  for r in recs:
    assert r["bench"] == "step"
    for field in STEP_FIELDS:
      assert field in r, field
    # Fixed per-device batch: the global batch grows with the devices.
    assert r["per_device_batch"] == 8 and r["global_batch"] == 8 * r["devices"]
    assert r["lists_per_s_min"] <= r["lists_per_s"] <= r["lists_per_s_max"]
    assert r["flops_per_list"] > 0 and r["achieved_flops_per_s"] > 0
    assert r["peak_rss_gb"] > 0 and r["platform"] == "cpu"
  by_step = {r["step"]: r for r in recs if r["devices"] == 1}
  # The adversarial step does more work than the backbone step (XLA's count).
  assert by_step["model"]["flops_per_list"] > by_step["direct"]["flops_per_list"]


def test_step_benchmark_compares_the_adversarial_orders():
  proc = _run("benchmarks.step", *TINY, "--steps=", "--compare_orders")
  assert proc.returncode == 0, proc.stderr[-3000:]
  (rec,) = _records(proc.stdout)
  assert rec["bench"] == "adversarial_orders"
  for name in ("direct", "sequential", "simultaneous"):
    assert rec[name]["lists_per_s"] > 0 and rec[name]["repeats"] == 2
  for order in ("sequential", "simultaneous"):
    ratio = rec[f"{order}_over_direct_step_time"]   # of the median step times
    d, o = rec["direct"], rec[order]
    assert (d["lists_per_s_min"] / o["lists_per_s_max"] <= ratio
            <= d["lists_per_s_max"] / o["lists_per_s_min"])


def test_step_benchmark_times_and_sizes_sharded_tables():
  proc = _run("benchmarks.step", *TINY, "--steps=model", "--devices=2",
              "--model_parallel=1,2", "--table_items=4001", "--table_devices=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  recs = _records(proc.stdout)
  steps = [r for r in recs if r["bench"] == "step"]
  assert [r["model_parallel"] for r in steps] == [1, 2]
  assert all(r["lists_per_s"] > 0 for r in steps)
  memory = {(r["items"], r["model_parallel"]): r for r in recs
            if r["bench"] == "table_memory"}
  assert sorted(memory) == [(4001, 1), (4001, 2)]
  for r in memory.values():
    # What the devices hold is the analytic state, plus the step count and key.
    assert 0 <= r["allocated_bytes"] - r["analytic_state_bytes"] < 64
    assert r["compiled_argument_bytes"] >= r["analytic_state_bytes"]
    assert r["compiled_total_bytes"] >= r["compiled_argument_bytes"]
  rep, shard = memory[(4001, 1)], memory[(4001, 2)]
  # Halving the tables halves their bytes on a device (4001 rows: 2001 per shard).
  assert shard["analytic_table_params_bytes"] * 2 == pytest.approx(
      rep["analytic_table_params_bytes"], rel=1e-3)
  assert shard["allocated_bytes"] < 0.6 * rep["allocated_bytes"]
  assert shard["compiled_total_bytes"] < 0.7 * rep["compiled_total_bytes"]


@pytest.mark.parametrize("source", ["records", "own_lists"])
def test_disk_input_benchmark_reports_feed_step_and_memory(tmp_path, source):
  proc = _run("benchmarks.disk_input", "--lists=3000,6000", f"--workdir={tmp_path}",
              "--batch_size=32", "--feed_batches=20", "--train_steps=5",
              f"--source={source}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  recs = _records(proc.stdout)
  assert [r["lists"] for r in recs] == [3000, 6000]
  for r in recs:
    for field in ("feed_lists_per_s", "step_lists_per_s",
                  "train_from_disk_lists_per_s", "peak_rss_gb", "file_gb"):
      assert r[field] > 0, field
    assert r["feed_over_step"] == pytest.approx(
        r["feed_lists_per_s"] / r["step_lists_per_s"])
  if source == "records":
    assert all(r["write_lists_per_s"] > 0 and r["train_lists"] == r["lists"]
               for r in recs)
    assert sorted(os.listdir(tmp_path)) == [
        "lists_3000.list_records", "lists_3000.list_records.json",
        "lists_6000.list_records", "lists_6000.list_records.json"]
  else:
    # Prepared as experiments.lists --input=disk prepares: 0.1% each for valid and
    # test, the rest trained from the list records beside the TFDS files.
    for r in recs:
      assert r["prepare_s"] > 0 and r["prepare_peak_rss_gb"] > 0
      assert 0.99 * r["lists"] <= r["train_lists"] < r["lists"]
    assert len(list(tmp_path.rglob("train.list_records"))) == 2


def test_step_benchmark_reports_each_steps_matmul_ceiling():
  with_torch = importlib.util.find_spec("torch") is not None
  proc = _run("benchmarks.step", *TINY, "--steps=direct,model", "--roofline",
              *(["--compare_torch"] if with_torch else []))
  assert proc.returncode == 0, proc.stderr[-3000:]
  recs = _records(proc.stdout)
  step = {r["step"]: r for r in recs if r["bench"] == "step"}
  (rec,) = [r for r in recs if r["bench"] == "roofline"]
  # The model's dense shapes over one step's tokens (batch 8 x 6 candidates, d = 8).
  assert rec["gemms"] == [[48, 8, 8], [48, 8, 16], [48, 16, 8]]
  rates = [rec["jax_gemm_flops_per_s"]] + ([rec["torch_gemm_flops_per_s"]]
                                           if with_torch else [])
  assert min(rates) > 0
  assert sorted(rec["steps"]) == ["direct", "model"]
  vs = {r["step"]: r for r in recs if r["bench"] == "vs_torch"}
  for name, s in rec["steps"].items():
    assert s["flops_per_list"] == step[name]["flops_per_list"]
    assert s["ceiling_lists_per_s"] == pytest.approx(max(rates) / s["flops_per_list"])
    # With --compare_torch, the interleaved comparison's dnr-jax timing is the one.
    measured = (vs[name]["jax_timing"] if with_torch else step[name])["lists_per_s"]
    assert s["lists_per_s"] == measured
    assert s["of_ceiling"] == pytest.approx(measured / s["ceiling_lists_per_s"])
    if with_torch:
      torch_rate = vs[name]["torch_timing"]["lists_per_s"]
      assert s["twice_torch_over_ceiling"] == pytest.approx(
          2 * torch_rate / s["ceiling_lists_per_s"])


def test_roofline_arithmetic():
  gemms = roofline.model_gemms(100, 4)
  assert gemms == [(100, 4, 4), (100, 4, 8), (100, 8, 4)]
  # 2 * 100 * (16 + 32 + 32) FLOPs in 4 s.
  assert roofline.gemm_rate(gemms, [1.0, 1.0, 2.0]) == pytest.approx(16_000 / 4)
  assert roofline.ceiling(4_000.0, 50.0) == 80.0
  with pytest.raises(ValueError, match="one positive time per shape"):
    roofline.gemm_rate(gemms, [1.0, 1.0])
  with pytest.raises(ValueError, match="one positive time per shape"):
    roofline.gemm_rate(gemms, [1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="positive"):
    roofline.ceiling(4_000.0, 0.0)


def test_step_benchmark_rejects_bad_flags():
  proc = _run("benchmarks.step", *TINY, "--steps=direct,train")
  assert proc.returncode != 0
  assert "--steps=direct,train" in proc.stderr


@pytest.mark.slow
def test_gpu_check_quick_runs_every_section(tmp_path):
  proc = _run("benchmarks.gpu_check", "--quick", "--budget_s=1e9",
              env={"OUT": str(tmp_path)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = _records(proc.stdout)
  written = _records((tmp_path / "gpu.jsonl").read_text())
  assert printed == written
  assert not [r for r in written if "error" in r or "skipped" in r], written
  steps = [(r["section"], r["step"]) for r in written if r["bench"] == "step"]
  assert steps == [(f"step_{d}", s) for d in ("fp32", "bf16")
                   for s in ("direct", "heuristic", "model", "eval")]
  (epoch,) = [r for r in written if r["bench"] == "ml1m_epoch"]
  assert epoch["steps"] > 0 and epoch["epoch_s_on_device"] > 0
  assert len(epoch["epoch_s_pipeline"]) == 2
  vs = [r for r in written if r["bench"] == "vs_torch"]
  if importlib.util.find_spec("torch") is not None:
    assert [r["step"] for r in vs] == ["direct", "model"]
    assert all(r["jax_over_torch"] > 0 for r in vs)
  else:   # without the bench extra the section says so instead of failing
    assert [r["unavailable"] for r in vs] == ["needs torch: pip install -e '.[bench]'"]
  assert written[-1] == {**written[-1], "bench": "gpu_check", "done": True}


def test_gpu_check_imports_no_tensorflow_datasets():
  # The GPU machine has neither TFDS nor tensorboardX.
  code = ("import sys, benchmarks.gpu_check, benchmarks.torch_prm, dnr_jax.step, "
          "dnr_jax.runtime.pipeline; bad = [m for m in ('tensorflow_datasets', 'tensorboardX', "
          "'tensorflow') if m in sys.modules]; assert not bad, bad")
  if importlib.util.find_spec("torch") is None:
    code = code.replace("benchmarks.torch_prm, ", "")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
