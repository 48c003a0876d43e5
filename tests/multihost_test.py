"""Multi-process training and evaluation on JAX's distributed runtime, on localhost.

Two processes with 2 CPU devices each (gloo collectives) run the synthetic binary
and must give what one process with 4 devices gives: the same parameters in the
final checkpoint and the same per-epoch training, validation and test metrics; and
only one of them writes the run's files. A 2-process run with its tables split over
all 4 devices (``--model_parallel=4``: each table shard's group spans both
processes) stopped after one epoch and started again resumes from its sharded
checkpoint and ends where the uninterrupted replicated run did.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dnr_jax.runtime import distributed
from dnr_jax import errors

import child_env  # pylint: disable=g-bad-import-order  (tests/child_env.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900
EPOCHS = 2
# Tiny, and one compiled train step (DNR's model phase from the first epoch: both
# players, noise and dropout keyed by the device index, every collective).
FLAGS = ["--methods=dnr_g", "--warmup_epochs=0", f"--num_epochs={EPOCHS}",
         "--seeds=0", "--batch_size=16", "--hidden=8", "--num_heads=1",
         "--num_layers=1", "--generator_hidden=8", "--train_lists=64",
         "--num_users=30", "--num_items=30", "--list_size=8", "--plots=false"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, devices: int, log, extra=()) -> subprocess.Popen:
  env = child_env.jax_child_env(devices, PYTHONPATH=ROOT)
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.synthetic", *FLAGS, f"--workdir={workdir}",
       *extra],
      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_all(procs: dict, logs: dict) -> None:
  """Waits for every process; on a failure or timeout kills the rest and says why."""
  deadline = time.time() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs.values()):
      failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
      if failed or time.time() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
      p.wait()
  bad = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
  if bad:
    tails = []
    for n in bad:
      with open(logs[n]) as f:
        tails.append(f"--- {n} (exit {bad[n]}), last lines:\n" +
                     "".join(f.readlines()[-25:]))
    pytest.fail(f"processes failed or timed out after {TIMEOUT_S}s: {bad}\n"
                + "\n".join(tails))


def _final_params(run_dir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Checkpoints are named by global step (dnr_jax/runtime/checkpoints.py): take the last.
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  last = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  path = os.path.abspath(os.path.join(ckpt_dir, str(last), "state"))
  # As host arrays: a sharded checkpoint names devices this process does not have.
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  meta)))
  return {k: state[k]["params"] for k in ("reranker", "generator")}


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  logs = {n: str(tmp / f"{n}.log") for n in ("single", "proc0", "proc1")}
  procs = {}
  handles = {n: open(path, "w") for n, path in logs.items()}
  try:
    procs["single"] = _start(tmp / "single", 4, handles["single"],
                             ["--distributed=off"])
    for i in range(2):
      procs[f"proc{i}"] = _start(
          tmp / "multi", 2, handles[f"proc{i}"],
          [f"--coordinator_address=localhost:{port}", "--num_processes=2",
           f"--process_id={i}"])
    _wait_all(procs, logs)
    # A 2-process run stopped after epoch 1 and run again to EPOCHS: it resumes from
    # its multi-process checkpoint (both processes restore the same step), with the
    # tables sharded across the processes.
    for phase, epochs in (("first", 1), ("resumed", EPOCHS)):
      names = [f"{phase}{i}" for i in range(2)]
      for n in names:
        logs[n] = str(tmp / f"{n}.log")
        handles[n] = open(logs[n], "w")
      port = _free_port()
      phase_procs = {n: _start(
          tmp / "resume", 2, handles[n],
          [f"--coordinator_address=localhost:{port}", "--num_processes=2",
           f"--process_id={i}", f"--num_epochs={epochs}", "--model_parallel=4"])
                     for i, n in enumerate(names)}
      procs.update(phase_procs)
      _wait_all(phase_procs, logs)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
    for h in handles.values():
      h.close()
  return tmp, logs


def _run_dir(workdir):
  return os.path.join(workdir, "runs", "prm", "dnr_g", "seed0")


@pytest.mark.slow
def test_two_processes_train_evaluate_and_write_like_one(runs):
  # One test over the three 3-process runs: a module fixture shared by several tests
  # would run once in *each* pytest-xdist worker, and two copies of it at once on a
  # 2-core machine overran orbax's multi-process barrier timeouts.
  _check_training(runs)
  _check_evaluation(runs)
  _check_single_writer(runs)
  _check_resume(runs)


def _check_training(runs):
  tmp, logs = runs
  with open(logs["proc1"]) as f:
    assert "process 1 of 2: 2 local / 4 global cpu device(s)" in f.read()
  single, multi = _final_params(_run_dir(tmp / "single")), _final_params(
      _run_dir(tmp / "multi"))
  flat_s, tree_s = jax.tree_util.tree_flatten_with_path(single)
  flat_m, tree_m = jax.tree_util.tree_flatten_with_path(multi)
  assert tree_s == tree_m
  compared = 0
  for (path, a), (_, b) in zip(flat_s, flat_m):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      # The attention key bias adds the same q.b to every key's logit, so softmax
      # makes its gradient exactly zero: its updates are Adam-normalised rounding
      # noise, which differs with the order of the cross-device sums.
      continue
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
    compared += 1
  assert compared > 40
  # Training moved the parameters (the comparison is not of two initialisations).
  assert _metrics(_run_dir(tmp / "single"))[-1]["train"]["grad_norm_phi"] > 0


def _check_evaluation(runs):
  tmp, _ = runs
  one, two = _metrics(_run_dir(tmp / "single")), _metrics(_run_dir(tmp / "multi"))
  assert [r["epoch"] for r in two] == list(range(1, EPOCHS + 1))   # written once
  for r1, r2 in zip(one, two):
    for split in ("train", "valid", "test"):
      assert r2[split].keys() == r1[split].keys()
      for k in r1[split]:
        assert r2[split][k] == pytest.approx(r1[split][k], rel=1e-4, abs=1e-5), (
            r1["epoch"], split, k)
  with open(tmp / "single" / "results.json") as f:
    res1 = json.load(f)
  with open(tmp / "multi" / "results.json") as f:
    res2 = json.load(f)
  # The tolerance of the per-epoch records above: 2x2 and 1x4 devices reduce in a
  # different order (logit_spread, a ratio of small sums, moves by ~1e-4 relative).
  assert res2["runs"][0]["test"] == pytest.approx(res1["runs"][0]["test"], rel=1e-4,
                                                  abs=1e-5)


def _check_single_writer(runs):
  tmp, _ = runs
  def files(root):
    # TensorBoard names its file by time and host: keep the kind only.
    return sorted(os.path.relpath(os.path.join(d, f.split(".")[0] if
                                               f.startswith("events.") else f), root)
                  for d, _, fs in os.walk(root) for f in fs
                  if "checkpoints" not in d)
  single, multi = files(tmp / "single"), files(tmp / "multi")
  assert multi == single      # one events file, one results table, ...
  assert sum(f.endswith("tb/events") for f in multi) == 1
  # One checkpoint per epoch, named by global step: the same in both runs.
  ckpts = lambda root: sorted(os.listdir(os.path.join(_run_dir(root), "checkpoints")))
  assert ckpts(tmp / "multi") == ckpts(tmp / "single")
  assert len(ckpts(tmp / "multi")) == EPOCHS


def _check_resume(runs):
  tmp, logs = runs
  for i in range(2):
    with open(logs[f"resumed{i}"]) as f:
      log = f.read()
    assert "resumed from" in log and "at epoch 2" in log, log[-2000:]
  # The same parameters and the same epochs, each once, as the uninterrupted
  # replicated run (up to the order of the sums: sharded tables reduce their
  # gradients and norms in another order). The checkpoint holds the tables padded
  # to a multiple of 4 rows (31 -> 32): only the real rows are compared, and the
  # padding rows stayed zero.
  whole, resumed = _final_params(_run_dir(tmp / "multi")), _final_params(
      _run_dir(tmp / "resume"))
  padded = 0
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(whole)[0],
                               jax.tree_util.tree_flatten_with_path(resumed)[0]):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      continue          # rounding noise, as in _check_training
    if b.shape != a.shape:
      assert "embedding" in name and b.shape[0] == 4 * -(-a.shape[0] // 4), name
      np.testing.assert_array_equal(b[a.shape[0]:], 0, err_msg=name)
      b = b[:a.shape[0]]
      padded += 1
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
  assert padded == 4      # both players' item and user tables were sharded
  one, two = _metrics(_run_dir(tmp / "multi")), _metrics(_run_dir(tmp / "resume"))
  assert [r["epoch"] for r in two] == list(range(1, EPOCHS + 1))
  for r1, r2 in zip(one, two):
    assert r2["test"] == pytest.approx(r1["test"], rel=1e-4, abs=1e-5), r1["epoch"]


def test_config_validation_names_the_problem():
  with pytest.raises(errors.ConfigError, match="process_id=2 must be < num_processes=2"):
    distributed.DistributedConfig(coordinator_address="h:1", num_processes=2,
                                  process_id=2).validate()
  with pytest.raises(errors.ConfigError, match="is not HOST:PORT"):
    distributed.DistributedConfig(coordinator_address="localhost",
                                  num_processes=2, process_id=0).validate()
  with pytest.raises(errors.ConfigError, match="contradicts"):
    distributed.DistributedConfig(mode="off", num_processes=2).validate()


def test_config_validation_requires_all_settings_without_a_cluster(monkeypatch):
  for var in list(os.environ):
    if var.startswith(("SLURM_", "OMPI_", "TPU_", "KUBERNETES_")):
      monkeypatch.delenv(var)
  assert distributed.detected_cluster() is None
  with pytest.raises(errors.ConfigError, match="coordinator_address missing"):
    distributed.DistributedConfig(num_processes=2, process_id=0).validate()


def test_single_process_helpers_are_plain():
  assert distributed.is_primary()
  assert distributed.primary_first(lambda: 7, "x") == 7
  distributed.barrier("nothing to wait for")
  distributed.check_same(distributed.fingerprint({"a": np.arange(3)}), "x")
  a = {"a": np.arange(3), "b": np.ones(2, np.float32)}
  assert distributed.fingerprint(a) == distributed.fingerprint(dict(a))
  assert distributed.fingerprint(a) != distributed.fingerprint(
      {"a": np.arange(3), "b": np.zeros(2, np.float32)})


def test_auto_connects_only_to_a_cluster_of_several_processes(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed, "_use_cpu_collectives", lambda: None)
  monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
  assert distributed.initialize()["process_count"] == 1 and not calls
  monkeypatch.setattr(distributed, "detected_cluster", lambda: "SlurmCluster")
  for count in (1, None):    # one task, or a count nobody can tell: stay alone
    monkeypatch.setattr(distributed, "_detected_process_count", lambda c, n=count: n)
    distributed.initialize()
    assert not calls
  monkeypatch.setattr(distributed, "_detected_process_count", lambda c: 4)
  distributed.initialize(distributed.DistributedConfig(mode="off"))
  assert not calls
  distributed.initialize()
  assert len(calls) == 1 and calls[0]["coordinator_address"] is None   # JAX detects
  distributed.initialize(distributed.DistributedConfig(
      coordinator_address="h:1", num_processes=2, process_id=1))
  assert calls[1]["coordinator_address"] == "h:1" and calls[1]["process_id"] == 1
