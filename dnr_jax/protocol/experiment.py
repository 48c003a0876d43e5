"""The paper's experiment protocol: methods x backbones x seeds, tables and plots.

``run_experiment(experiment, data, workdir)`` trains every (backbone, method, seed)
with ``train.train_and_evaluate`` (model selection on validation NDCG@K, numbers on
test), then writes

* ``runs/<backbone>/<method>/seed<s>/``: ``metrics.jsonl``, TensorBoard event files
  (``tb/``, written with tensorboardX: no TensorFlow needed), orbax checkpoints, and
  ``bundle/``: the selected epoch's reranker as ``serving`` loads it (what
  ``experiments.rerank --checkpoint=<run dir>`` reads);
* ``results.md`` and ``results.csv``: mean +- std over seeds of H/NDCG/MAP/F1@K, AUC
  and the binary hit HR-any@K, in percent, with the retriever's own ranking as a row,
  and the paired t-test p-value (over seeds) of each DNR row against the best
  baseline of its backbone;
* ``plots/``: learning curves, the paper's Figure 5 (density of real retriever noise
  ``x - z`` beside Gaussian, Beta and the learned generator's ``x' - z``) and, with a
  sweep, Figure 3 (sensitivity to one hyper-parameter).

In a multi-process run every process trains and gets the same results; only process
0 writes these files (``distributed.is_primary``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

import jax
from absl import logging

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import train
from dnr_jax.data import types
from dnr_jax.errors import ConfigError
from dnr_jax.protocol import plots as plots_lib
from dnr_jax.protocol import report
from dnr_jax.runtime import distributed
from dnr_jax.runtime import pipeline
from dnr_jax.serving import bundle as bundle_lib

VARIANT_SEP = "+"


def parse_method(spec: str) -> tuple[str, dict[str, str]]:
  """A table row: ``"dnr_g"``, or a variant ``"dnr_g+loss.lx_estimator=mmd+warmup_epochs=0"``.

  A variant is a ``config.METHODS`` preset followed by ``+``-separated dotted-field
  settings that apply *after* the preset, so a variant can change what the preset
  fixes (``c_score+model.score_usage=add`` is the "+ score" row). Variants let one
  table compare, say, ``L_x`` estimators against the same baseline runs, with
  p-values.

  Returns:
    ``(preset, {dotted key: value text})``.
  """
  base, *parts = spec.split(VARIANT_SEP)
  if base not in config_lib.METHODS:
    raise ConfigError(f"unknown method {base!r} in {spec!r}; expected one of "
                      f"{sorted(config_lib.METHODS)}")
  settings = {}
  for part in parts:
    key, eq, value = part.partition("=")
    if not eq or not key or not value:
      raise ConfigError(f"method {spec!r}: {part!r} is not FIELD=VALUE")
    settings[key] = value
  return base, settings


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """What to run.

  Attributes:
    base: the training configuration every run starts from.
    overrides: dotted-key overrides (``config.with_overrides``) for every run, except
      the fields a method's preset fixes (``config.METHODS``): those define the table
      row, so ``--lambda_m=0.6`` sets DNR's L_z weight but leaves ``c_score`` without
      L_z, and ``--score_usage`` reaches only methods that do not fix it.
    methods: the table's rows: ``config.METHODS`` names or variants of them
      (``parse_method``).
    backbones: reranker backbones; every method runs on each.
    seeds: one run per seed; the table reports mean +- std over them.
    sweeps: Figure 3, ``((dotted field, (v1, v2, ...)), ...)``; ``sweep_method`` is
      run on the first backbone for each value of each field and each seed (one
      panel per field).
    plots: write the PNG plots.
    allow_failed_runs: a run that diverges (``errors.TrainingDiverged``) is always
      a FAILED row of the table and the other runs go on; at the end
      ``run_experiment`` raises ``TrainingDiverged`` naming the failed runs unless
      this is True.
  """
  base: config_lib.TrainConfig
  overrides: tuple[tuple[str, Any], ...] = ()
  methods: tuple[str, ...] = ("backbone", "c_score", "dnr_g")
  backbones: tuple[str, ...] = ("prm",)
  seeds: tuple[int, ...] = (0, 1, 2)
  sweeps: tuple[tuple[str, tuple[Any, ...]], ...] = ()
  sweep_method: str = "dnr_g"
  plots: bool = True
  allow_failed_runs: bool = False


def run_config(experiment: ExperimentConfig, method: str, backbone: str, seed: int,
               extra: Optional[dict] = None, vocab: bool = True
               ) -> config_lib.TrainConfig:
  """The resolved config of one run: base, overrides, method preset, variant, identity.

  ``extra`` (a sweep point) applies after the preset and the variant: a sweep of
  ``loss.lambda_m`` must reach DNR's L_z weight, which the preset would otherwise keep.
  """
  preset, variant = parse_method(method)
  cfg = config_lib.with_overrides(experiment.base, dict(experiment.overrides))
  # The preset after the flags: a row of the table is what its method says.
  cfg = config_lib.apply_method(cfg, preset)
  cfg = config_lib.with_overrides(cfg, {
      k: config_lib.parse_value(cfg, k, v) for k, v in variant.items()})
  if extra:
    cfg = config_lib.with_overrides(cfg, {
        k: config_lib.parse_value(cfg, k, v) for k, v in extra.items()})
  cfg = dataclasses.replace(cfg, seed=seed,
                            model=dataclasses.replace(cfg.model, backbone=backbone))
  config_lib.validate(cfg, vocab=vocab)
  return cfg


def validate(experiment: ExperimentConfig) -> None:
  """Fails at once, naming the value, for any run the experiment would start."""
  if not experiment.methods or not experiment.backbones or not experiment.seeds:
    raise ConfigError("an experiment needs at least one method, backbone and seed")
  # A repeated seed would count one run twice in the mean, the std and the t-test.
  for name in ("methods", "backbones", "seeds"):
    values = list(getattr(experiment, name))
    twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
    if twice:
      raise ConfigError(f"{name} {values} repeat {twice}: each value is one run (a "
                        "repeat would count the same run twice)")
  for m in experiment.methods:
    for b in experiment.backbones:
      run_config(experiment, m, b, experiment.seeds[0], vocab=False)
  for field, values in experiment.sweeps:
    if not values:
      raise ConfigError(f"the sweep of {field!r} has no values")
    if len(set(values)) != len(values):
      raise ConfigError(f"the sweep of {field!r} repeats a value: {list(values)}")
    for v in values:
      run_config(experiment, experiment.sweep_method, experiment.backbones[0],
                 experiment.seeds[0], {field: v}, vocab=False)


class _TensorBoard:
  """Per-epoch scalars as TensorBoard event files (tensorboardX, no TensorFlow).

  ``restart`` (``train_and_evaluate``'s ``on_resume``) replaces the event files with
  the epochs the run resumed from, so after any number of kills and resumes the log
  holds each epoch exactly once. Non-finite values (a skipped-steps epoch's mean of
  no step) are left out.
  """

  def __init__(self, logdir: str):
    self.logdir = logdir
    self.writer = None

  def restart(self, history: list[dict]) -> None:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    if self.writer is not None:
      self.writer.close()
    if os.path.isdir(self.logdir):
      for name in os.listdir(self.logdir):
        if name.startswith("events.out.tfevents"):
          os.remove(os.path.join(self.logdir, name))
    self.writer = SummaryWriter(self.logdir)
    for record in history:
      self._write(record)
    self.writer.flush()

  def _write(self, record: dict) -> None:
    for split in ("train", "valid", "test"):
      for k, v in record[split].items():
        if v is not None and math.isfinite(v):
          self.writer.add_scalar(f"{split}/{k}", v, record["epoch"])
    self.writer.add_scalar("lists_per_s", record["lists_per_s"], record["epoch"])

  def __call__(self, record: dict) -> None:
    if self.writer is None:
      self.restart([])
    self._write(record)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _run_one(cfg: config_lib.TrainConfig, data: types.PreparedLists, run_dir: str,
             bundle_assets: Optional[dict] = None):
  """One run's result, or ``{"failed": message}`` if it diverged."""
  primary = distributed.is_primary()   # the one writer of the run's files
  tb = _TensorBoard(os.path.join(run_dir, "tb")) if primary else None
  try:
    result = train.train_and_evaluate(cfg, data, run_dir, on_epoch=tb,
                                      on_resume=tb.restart if tb else None)
  except errors.TrainingDiverged as e:
    logging.error("run %s FAILED: %s", run_dir, e)
    if primary:
      os.makedirs(run_dir, exist_ok=True)
      with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump({"failed": str(e)}, f, indent=2)
    return {"failed": str(e)}
  finally:
    if tb is not None:
      tb.close()
    # Runs share no compiled program (each has its own step closures), and under
    # jax.pmap the executables of finished runs are never freed: without this, a
    # table of dozens of runs ends in "LLVM ERROR: Unable to allocate section memory".
    jax.clear_caches()
  if not primary:
    return result
  with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({k: result[k] for k in ("best_epoch", "valid", "test", "retriever",
                                      "stop_reason", "under_trained")}, f, indent=2)
  shapes = data.splits["valid"]    # the training split's shapes (it may be on disk)
  bundle_lib.save_bundle(os.path.join(run_dir, bundle_lib.RUN_BUNDLE),
                         bundle_lib.Bundle.from_result(
                             result, list_size=shapes["items"].shape[1],
                             history_size=shapes["history"].shape[1],
                             **(bundle_assets or {})))
  return result


def _base_points(experiment: ExperimentConfig, rows: list[dict]) -> list[dict]:
  """The swept method's own runs as sweep points at the values they trained with.

  Figure 3 then shows the configured value beside the swept ones without training
  it twice; these points are marked ``"base": True``.
  """
  points = []
  for field, _ in experiment.sweeps:
    for r in rows:
      if (r["backbone"], r["method"]) != (experiment.backbones[0],
                                          experiment.sweep_method) or r.get("failed"):
        continue
      points.append({"field": field, "value": config_lib.flatten(r["config"])[field],
                     "seed": r["seed"], "method": r["method"], "base": True,
                     "ndcg": r["test"]["ndcg"], "valid_ndcg": r["valid"]["ndcg"],
                     "best_epoch": r["best_epoch"]})
  return points


def run_experiment(experiment: ExperimentConfig, data: types.PreparedLists,
                   workdir: str, *, bundle_assets: Optional[dict] = None
                   ) -> dict[str, Any]:
  """Runs every (backbone, method, seed), then the sweep; writes tables and plots.

  ``bundle_assets`` (``data_config``, ``vocabulary_dir``) go into every run's bundle:
  what reranking new lists of the same data needs (own lists).

  Returns:
    ``{"summary": table rows, "table": Markdown, "outputs": paths, "sweep": ...}``.
  """
  validate(experiment)
  experiment = dataclasses.replace(
      experiment, base=train.with_data_vocab(experiment.base, data))
  primary = distributed.is_primary()
  if primary:
    os.makedirs(workdir, exist_ok=True)
  jobs = [(b, m, s) for b in experiment.backbones for m in experiment.methods
          for s in experiment.seeds]
  sweep_jobs = [(f, v, s) for f, values in experiment.sweeps for v in values
                for s in experiment.seeds]
  total = len(jobs) + len(sweep_jobs)
  t0 = time.time()
  rows, histories, learned, failed = [], {}, None, []
  k = experiment.base.eval_k
  retriever = None
  for i, (backbone, method, seed) in enumerate(jobs):
    cfg = run_config(experiment, method, backbone, seed)
    logging.info("=== run %d/%d: backbone=%s method=%s seed=%d (%.0fs elapsed)",
                 i + 1, total, backbone, method, seed, time.time() - t0)
    run_dir = os.path.join(workdir, "runs", backbone, method, f"seed{seed}")
    result = _run_one(cfg, data, run_dir, bundle_assets)
    if result.get("failed"):
      rows.append({"backbone": backbone, "method": method, "seed": seed,
                   "failed": result["failed"], "config": dataclasses.asdict(cfg)})
      failed.append(f"{backbone}/{method}/seed{seed}")
      continue
    selected = next(r for r in result["history"] if r["epoch"] == result["best_epoch"])
    rows.append({"backbone": backbone, "method": method, "seed": seed,
                 "test": result["test"], "valid": result["valid"],
                 "best_epoch": result["best_epoch"], "config": result["config"],
                 "under_trained": result["under_trained"],
                 "stop_reason": result["stop_reason"],
                 "warnings": selected.get("warnings", [])})
    histories.setdefault((backbone, method), []).append(result["history"])
    retriever = result["retriever"]
    if learned is None and config_lib.generator_active(cfg, cfg.num_epochs - 1):
      learned = (cfg, result["final_state"].generator.params)
  if retriever is None:   # every run failed: the retriever's row still stands
    retriever = train.evaluate_retriever(
        pipeline.complete(data.splits["test"]), k=k,
        map_normaliser=experiment.base.map_normaliser, num_items=data.num_items)
  rows.append({"backbone": "-", "method": "retriever", "seed": 0, "test": retriever})
  sweep = []
  for j, (field, value, seed) in enumerate(sweep_jobs):
    cfg = run_config(experiment, experiment.sweep_method, experiment.backbones[0], seed,
                     {field: value})
    logging.info("=== run %d/%d: sweep %s=%s seed=%d (%.0fs elapsed)",
                 len(jobs) + j + 1, total, field, value, seed, time.time() - t0)
    run_dir = os.path.join(workdir, "sweep", f"{field}={value}", f"seed{seed}")
    result = _run_one(cfg, data, run_dir, bundle_assets)
    if result.get("failed"):
      failed.append(f"sweep {field}={value} seed{seed}")
      continue
    sweep.append({"field": field, "value": config_lib.parse_value(cfg, field, value),
                  "seed": seed, "method": experiment.sweep_method,
                  "ndcg": result["test"]["ndcg"],
                  # hyper-parameters are chosen on validation: the table shows both
                  "valid_ndcg": result["valid"]["ndcg"],
                  "best_epoch": result["best_epoch"]})
  if sweep:
    swept = {(p["field"], p["value"], p["seed"]) for p in sweep}
    sweep += [p for p in _base_points(experiment, rows)
              if (p["field"], p["value"], p["seed"]) not in swept]

  summary = report.summarize(rows, k)
  n = len(experiment.seeds)
  title = f"{data.name}: test metrics (%) at the best validation epoch, " + (
      f"mean ± std over {n} seeds" if n > 1 else "1 seed")
  if not data.is_real:
    title += " -- NOT the real data"
  md = report.write_table(summary, k, os.path.join(workdir, "results.md"),
                   os.path.join(workdir, "results.csv"), title, write=primary)
  baselines = [r for r in summary if r["backbone"] == experiment.backbones[0]
               and report.is_baseline(r["method"]) and not r.get("failed")]
  best = max(baselines, key=lambda r: r["mean"]["ndcg"]) if baselines else None
  if sweep:
    md += "\n" + report.sweep_table(sweep, k, best)
  if not primary:
    return _finish(experiment, summary, md, [], sweep, failed, total, workdir)
  if sweep:
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(md)
  outputs = [os.path.join(workdir, "results.md"), os.path.join(workdir, "results.csv")]
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"experiment": dataclasses.asdict(experiment), "failed": failed,
               "summary": summary, "runs": rows, "sweep": sweep,
               "data": {"name": data.name, "is_real": data.is_real,
                        "report": data.report}}, f, indent=2, default=str)
  outputs.append(os.path.join(workdir, "results.json"))
  if experiment.plots:
    cfg0 = learned[0] if learned else run_config(
        experiment, experiment.methods[0], experiment.backbones[0], experiment.seeds[0])
    model_cfg = dataclasses.replace(cfg0.model, num_items=data.num_items,
                                    num_users=data.num_users)
    noise = plots_lib.noise_samples(data, cfg0.noise, model_cfg,
                          learned[1] if learned else None)
    outputs += plots_lib.write_plots(workdir, histories, noise, sweep,
                      (best["method"], best["mean"]["ndcg"]) if best else None, k)
  logging.info("done: %d runs in %.0fs; outputs:\n  %s", total, time.time() - t0,
               "\n  ".join(outputs))
  return _finish(experiment, summary, md, outputs, sweep, failed, total, workdir)


def _finish(experiment, summary, md, outputs, sweep, failed, total, workdir):
  # Every process (not only the one that wrote the files) reports diverged runs.
  if failed:
    message = (f"{len(failed)} of {total} runs diverged ({', '.join(failed)}); the "
               f"table marks them FAILED: {os.path.join(workdir, 'results.md')}")
    if not experiment.allow_failed_runs:
      raise errors.TrainingDiverged(message)
    logging.error("%s", message)
  return {"summary": summary, "table": md, "outputs": outputs, "sweep": sweep}
