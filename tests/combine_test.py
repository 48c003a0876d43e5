"""Combining the results of separate runs into one table (protocol.combine)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dnr_jax import config as config_lib
from dnr_jax.errors import ConfigError
from dnr_jax.protocol import combine
from dnr_jax.protocol import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("hr", "ndcg", "map", "f1", "global_auc", "hit_any", "ndcg_shuffled_scores")


def _run(method, seed, ndcg, **config):
  cfg = config_lib.apply_method(config_lib.TrainConfig(**config), method)
  return {"backbone": "prm", "method": method, "seed": seed,
          "test": {m: ndcg for m in METRICS}, "valid": {"ndcg": ndcg},
          "best_epoch": 3, "config": config_lib.to_dict(cfg), "under_trained": False,
          "warnings": []}


def _file(tmp_path, name, runs, data_name="ML", report_=None):
  path = tmp_path / name / "results.json"
  path.parent.mkdir()
  retriever = {"backbone": "-", "method": "retriever", "seed": 0,
               "test": {m: 0.1 for m in METRICS}}
  path.write_text(json.dumps({"runs": runs + [retriever], "data": {
      "name": data_name, "is_real": True, "report": report_ or {"lists": 10}}}))
  return str(path)


def test_seeds_from_several_files_make_one_table_with_t_tests(tmp_path):
  c = {0: 0.150, 1: 0.152, 2: 0.149}
  d = {0: 0.160, 1: 0.165, 2: 0.158}
  a = _file(tmp_path, "a", [_run("c_score", 0, c[0]), _run("dnr_g", 0, d[0])])
  b = _file(tmp_path, "b", [_run("c_score", s, c[s]) for s in (1, 2)]
            + [_run("dnr_g", s, d[s]) for s in (1, 2)])
  out = combine.combine([a, b])
  rows = {r["method"]: r for r in out["summary"]}
  assert rows["c_score"]["n_seeds"] == rows["dnr_g"]["n_seeds"] == 3
  assert rows["dnr_g"]["p_vs"] == "c_score"
  want = report.paired_t_test([d[s] for s in range(3)], [c[s] for s in range(3)])
  assert rows["dnr_g"]["p_value"] == pytest.approx(want)
  assert rows["dnr_g"]["mean"]["ndcg"] == pytest.approx(np.mean(list(d.values())))
  assert [r["method"] for r in out["summary"]] == ["c_score", "dnr_g", "retriever"]
  assert out["sources"]["prm/dnr_g/seed0"] == a
  md = combine.write(out, str(tmp_path / "out"), "ML")
  assert "3 seeds" in md and "vs c_score (p = " in md
  for name in ("results.md", "results.csv", "results.json"):
    assert os.path.exists(tmp_path / "out" / name)


def test_the_table_never_overwrites_an_input(tmp_path):
  a = _file(tmp_path, "a", [_run("c_score", 0, 0.1)])
  with pytest.raises(ConfigError, match="holds one of the combined results.json"):
    combine.write(combine.combine([a]), str(tmp_path / "a"), "ML")


def test_a_run_given_twice_is_taken_from_the_later_file(tmp_path):
  a = _file(tmp_path, "a", [_run("backbone", 0, 0.07)])
  b = _file(tmp_path, "b", [_run("backbone", 0, 0.13)])
  (row, _) = combine.combine([a, b])["summary"]
  assert row["n_seeds"] == 1 and row["mean"]["ndcg"] == pytest.approx(0.13)


def test_different_configs_of_a_row_are_refused_unless_ignored(tmp_path):
  a = _file(tmp_path, "a", [_run("c_score", 0, 0.1)])
  b = _file(tmp_path, "b", [_run("c_score", 1, 0.1, early_stopping_min_epochs=50)])
  with pytest.raises(ConfigError, match=r"prm/c_score: seed 0 .* seed 1 .* "
                     r"early_stopping_min_epochs: 0 vs 50"):
    combine.combine([a, b])
  out = combine.combine([a, b], ignore_fields=["early_stopping_min_epochs"])
  assert out["summary"][0]["n_seeds"] == 2
  assert out["ignored_fields"] == ["early_stopping_min_epochs"]


def test_runs_of_other_data_are_refused(tmp_path):
  a = _file(tmp_path, "a", [_run("c_score", 0, 0.1)])
  b = _file(tmp_path, "b", [_run("c_score", 1, 0.1)], report_={"lists": 11})
  with pytest.raises(ConfigError, match="another data set .* preparation report "
                     "differs, first in lists: 11 vs 10"):
    combine.combine([a, b])
  # How long the preparation took is no difference.
  c = _file(tmp_path, "c", [_run("c_score", 1, 0.1)], report_={
      "lists": 10, "seconds": 3.0, "stage_seconds": {"k_core": 0.1}})
  assert combine.combine([a, c])["summary"][0]["n_seeds"] == 2
  d = _file(tmp_path, "d", [_run("c_score", 2, 0.1)], data_name="KuaiRand")
  with pytest.raises(ConfigError, match="another data set .*'KuaiRand' vs 'ML'"):
    combine.combine([a, d])
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ConfigError, match="not a results.json"):
    combine.combine([str(tmp_path / "bad.json")])


def test_the_binary_writes_the_table(tmp_path):
  a = _file(tmp_path, "a", [_run("c_score", 0, 0.1), _run("dnr_g", 0, 0.12)])
  b = _file(tmp_path, "b", [_run("c_score", 1, 0.11), _run("dnr_g", 1, 0.125)])
  proc = subprocess.run([sys.executable, "-m", "experiments.combine",
                         f"--results={a},{b}", f"--out={tmp_path / 'out'}",
                         "--title=Test data"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "### Test data: test metrics (%)" in proc.stdout and "2 seeds" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "experiments.combine",
                        f"--results={tmp_path}/none.json", f"--out={tmp_path / 'o2'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("ConfigError: ")
