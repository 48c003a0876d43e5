"""Tests of the experiment protocol: tables, t-tests, plots, TensorBoard files."""

import dataclasses
import glob
import math
import os

import numpy as np
import pytest

from dnr_jax import config as config_lib
from dnr_jax.protocol import experiment
from dnr_jax.protocol import report
from dnr_jax import synthetic
from dnr_jax import train


def _row(method, seed, ndcg, backbone="prm"):
  test = {k: 0.5 for k, _ in report.COLUMNS}
  test["ndcg"] = ndcg
  return {"backbone": backbone, "method": method, "seed": seed, "test": test}


def test_summary_mean_std_and_paired_t_test():
  rows = ([_row("c_score", s, v) for s, v in enumerate([0.50, 0.52, 0.51])]
          + [_row("backbone", s, v) for s, v in enumerate([0.40, 0.41, 0.42])]
          + [_row("dnr_g", s, v) for s, v in enumerate([0.55, 0.58, 0.56])])
  summary = {r["method"]: r for r in report.summarize(rows, k=6)}
  np.testing.assert_allclose(summary["c_score"]["mean"]["ndcg"], 0.51)
  np.testing.assert_allclose(summary["c_score"]["std"]["ndcg"], 0.01)
  assert summary["dnr_g"]["p_vs"] == "c_score"    # the best baseline, not the worst
  from scipy import stats
  want = stats.ttest_rel([0.55, 0.58, 0.56], [0.50, 0.52, 0.51]).pvalue
  np.testing.assert_allclose(summary["dnr_g"]["p_value"], want)
  assert "p_value" not in summary["c_score"]


def test_single_seed_has_no_p_value(tmp_path):
  rows = [_row("c_score", 0, 0.5), _row("dnr_g", 0, 0.6)]
  summary = report.summarize(rows, k=6)
  assert math.isnan([r for r in summary if r["method"] == "dnr_g"][0]["p_value"])
  md = report.write_table(summary, 6, str(tmp_path / "t.md"),
                              str(tmp_path / "t.csv"), "title")
  assert "+10.00 vs c_score (p n/a: 1 seed)" in md and "| 60.00 |" in md
  assert "±" not in md.split("\n", 2)[2]   # one seed: no spread to show
  assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("backbone,method")


def test_bad_experiment_fails_before_any_run():
  base = config_lib.TrainConfig(model=config_lib.ModelConfig(num_items=10))
  with pytest.raises(ValueError, match="unknown method 'dnr'"):
    experiment.validate(experiment.ExperimentConfig(base=base, methods=("dnr",)))
  with pytest.raises(ValueError, match="unknown config field 'loss.lambda_q'"):
    experiment.validate(experiment.ExperimentConfig(
        base=base, sweeps=(("loss.lambda_q", ("0.1",)),)))
  with pytest.raises(ValueError, match="warmup_epochs='2.5' is not a valid int"):
    experiment.validate(experiment.ExperimentConfig(
        base=base, sweeps=(("warmup_epochs", ("2.5",)),)))
  with pytest.raises(ValueError, match="'lambda_x' is not FIELD=VALUE"):
    experiment.validate(experiment.ExperimentConfig(
        base=base, methods=("dnr_g+lambda_x",)))
  with pytest.raises(ValueError, match=r"methods \[.dnr_g., .dnr_g.\] repeat"):
    experiment.validate(experiment.ExperimentConfig(
        base=base, methods=("dnr_g", "dnr_g")))


def test_sweep_table_shows_the_validation_score_to_choose_by():
  point = lambda v, seed, valid, test, epoch: {
      "field": "noise.lambda_c", "value": v, "seed": seed, "method": "dnr_g",
      "ndcg": test, "valid_ndcg": valid, "best_epoch": epoch}
  sweep = [point(0.2, 0, 0.10, 0.20, 5), point(0.2, 1, 0.12, 0.22, 7),
           point(0.6, 0, 0.30, 0.15, 9)]
  md = report.sweep_table(sweep, 6, None)
  assert "| field | value | valid N@6 | test N@6 | best epoch | seeds |" in md
  assert "| noise.lambda_c | 0.2 | 11.00 ± 1.41 | 21.00 ± 1.41 | 5, 7 | 2 |" in md
  assert "| noise.lambda_c | 0.6 | 30.00 | 15.00 | 9 | 1 |" in md
  # a point read from an older results.json has no validation score: "-", not 0
  old = [{k: v for k, v in sweep[2].items() if k not in ("valid_ndcg", "best_epoch")}]
  assert "| noise.lambda_c | 0.6 | - | 15.00 | - | 1 |" in report.sweep_table(old, 6, None)


def test_variants_apply_after_the_preset_and_sweeps_after_the_variant():
  base = config_lib.TrainConfig(model=config_lib.ModelConfig(num_items=10))
  exp = experiment.ExperimentConfig(base=base, overrides=(("loss.lambda_m", 0.6),))
  cfg = experiment.run_config(exp, "dnr_g+loss.lx_estimator=mmd+warmup_epochs=0", "prm", 3)
  assert (cfg.method, cfg.loss.lx_estimator, cfg.warmup_epochs, cfg.seed) == \
      ("dnr_g", "mmd", 0, 3)
  assert cfg.loss.lambda_m == 0.6                      # the flag reaches DNR
  assert experiment.run_config(exp, "c_score", "prm", 0).loss.lambda_m == 0.0
  # A variant may change what the preset fixes: this is the "+ score" row.
  assert experiment.run_config(exp, "c_score+model.score_usage=add", "prm",
                               0).model.score_usage == "add"
  swept = experiment.run_config(exp, "dnr_g+loss.lambda_m=0.2", "prm", 0,
                                {"loss.lambda_m": "1.0"})
  assert swept.loss.lambda_m == 1.0 and isinstance(swept.warmup_epochs, int)


def test_every_non_baseline_row_is_tested_against_the_best_baseline():
  rows = ([_row("backbone", s, v) for s, v in enumerate([0.40, 0.41, 0.42])]
          + [_row("c_score", s, v) for s, v in enumerate([0.50, 0.52, 0.51])]
          + [_row("heuristic_g", s, v) for s, v in enumerate([0.60, 0.61, 0.62])]
          + [_row("dnr_g+warmup_epochs=0", s, v)
             for s, v in enumerate([0.49, 0.53, 0.52])])
  summary = {r["method"]: r for r in report.summarize(rows, k=6)}
  # heuristic_g is not a baseline even though it is the best row.
  assert summary["heuristic_g"]["p_vs"] == "c_score"
  np.testing.assert_allclose(summary["heuristic_g"]["delta_ndcg"], 0.10)
  assert summary["dnr_g+warmup_epochs=0"]["p_vs"] == "c_score"
  np.testing.assert_allclose(summary["dnr_g+warmup_epochs=0"]["delta_ndcg"], 0.01 / 3,
                             atol=1e-4)
  assert "p_value" not in summary["backbone"]


@pytest.mark.slow
def test_run_experiment_writes_every_output(tmp_path):
  data = synthetic.generate(synthetic.SyntheticConfig(
      num_users=40, num_items=60, list_size=10, history_size=5,
      num_lists=(256, 64, 64)))
  base = config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=16, num_heads=2),
      noise=config_lib.NoiseConfig(generator_hidden=8),
      num_epochs=2, warmup_epochs=1, global_batch_size=64, eval_batch_size=64,
      log_every_steps=0)
  exp = experiment.ExperimentConfig(
      base=base, methods=("c_score", "dnr_g"), seeds=(0,),
      sweeps=(("noise.lambda_c", ("0.6",)), ("warmup_epochs", ("0",))),
      sweep_method="dnr_g")
  out = experiment.run_experiment(exp, data, str(tmp_path))
  for name in ("results.md", "results.csv", "results.json",
               "plots/learning_curves.png", "plots/noise_density.png",
               "plots/sensitivity.png"):
    assert (tmp_path / name).exists(), name
  assert glob.glob(str(tmp_path / "runs/prm/dnr_g/seed0/tb/events.out.tfevents.*"))
  assert "NOT the real data" in out["table"]
  assert "| noise.lambda_c | 0.6 |" in out["table"]     # the Figure 3 table
  assert "| warmup_epochs | 0 |" in out["table"]
  assert {"valid_ndcg", "best_epoch"} <= set(out["sweep"][0])
  # dnr_g's own run stands in Figure 3 at its configured values, not trained again
  assert "| noise.lambda_c | 0.4 (configured) |" in out["table"]
  assert "| warmup_epochs | 1 (configured) |" in out["table"]
  assert len(out["sweep"]) == 4
  methods = [r["method"] for r in out["summary"]]
  assert methods == ["c_score", "dnr_g", "retriever"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux only")
def test_runs_free_their_compiled_programs(tmp_path):
  # jax.pmap keeps every executable it compiled; without clearing them, an
  # experiment of dozens of runs dies with "LLVM ERROR: Unable to allocate section
  # memory".
  data = synthetic.generate(synthetic.SyntheticConfig(
      num_users=40, num_items=60, list_size=10, history_size=5,
      num_lists=(128, 64, 64)))
  cfg = config_lib.apply_method(config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=16, num_heads=2),
      noise=config_lib.NoiseConfig(generator_hidden=8), num_epochs=2, warmup_epochs=1,
      global_batch_size=64, eval_batch_size=64, log_every_steps=0, compile="pmap"),
      "dnr_g")
  cfg = train.with_data_vocab(cfg, data)
  maps = []
  for seed in range(3):
    experiment._run_one(dataclasses.replace(cfg, seed=seed), data,  # pylint: disable=protected-access
                        str(tmp_path / f"seed{seed}"))
    with open("/proc/self/maps") as f:
      maps.append(sum(1 for _ in f))
  # Without clearing, each such run leaves ~2,800 maps behind.
  assert maps[2] - maps[1] < 500, maps
