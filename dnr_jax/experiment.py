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

import csv
import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import distributed
from dnr_jax import errors
from dnr_jax import noise as noise_lib
from dnr_jax import pipeline
from dnr_jax import serving
from dnr_jax import train
from dnr_jax.data import types
from dnr_jax.errors import ConfigError

# (key in the metrics dicts, column header)
# H@K is the paper's hit ratio (hits / max(K, #positives), dnr_jax.metrics); HR-any@K
# the binary "some positive in the top K".
COLUMNS = (("hr", "H@{k}"), ("ndcg", "N@{k}"), ("map", "M@{k}"), ("f1", "F1@{k}"),
           ("global_auc", "AUC"), ("hit_any", "HR-any@{k}"),
           ("ndcg_shuffled_scores", "N@{k}, scores shuffled"))
# The rows DNR is tested against: no generated scores at all. Every other row (the
# heuristic-only ones, DNR and its ablations, variants of them) gets a p-value against
# the best of these.
BASELINES = ("backbone", "c_score", "add_score", "w_score")
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


def is_baseline(spec: str) -> bool:
  return spec in BASELINES


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
  train_split = data.splits["train"]
  serving.save_bundle(os.path.join(run_dir, serving.RUN_BUNDLE),
                      serving.Bundle.from_result(
                          result, list_size=train_split["items"].shape[1],
                          history_size=train_split["history"].shape[1],
                          **(bundle_assets or {})))
  return result


def paired_t_test(a, b) -> float:
  """Two-sided paired t-test p-value of ``a`` vs ``b`` over seeds (nan if < 2 seeds)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.size < 2:
    return float("nan")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = a - b
  if np.allclose(d, d[0]):   # zero variance: the t statistic is undefined
    return 0.0 if d[0] != 0 else 1.0
  return float(stats.ttest_rel(a, b).pvalue)


def summarize(rows: list[dict], k: int) -> list[dict]:
  """Aggregates per-seed results into table rows with mean, std and p-values.

  Args:
    rows: one dict per run: ``backbone``, ``method``, ``seed``, ``test`` (metrics).
    k: the K of the @K metrics, for the headers.

  Returns:
    One dict per (backbone, method): ``mean``/``std`` per metric key, ``n_seeds``,
    ``under_trained_seeds`` (the seeds whose best epoch was the last of
    ``num_epochs``: still improving when training ended), and for every row that is
    not a baseline (``BASELINES``) nor the retriever:
    ``p_vs`` (the best baseline of its backbone by mean NDCG), ``delta_ndcg`` (the
    mean paired NDCG difference to it) and ``p_value`` (two-sided paired t-test over
    the seeds both ran).
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["backbone"], r["method"]), []).append(r)
  out = []
  for (backbone, method), rs in groups.items():
    failed = [r for r in rs if r.get("failed")]
    if failed:
      # Never a plausible row from a run that diverged: the whole row is FAILED.
      out.append({"backbone": backbone, "method": method, "n_seeds": len(rs),
                  "seeds": sorted(r["seed"] for r in rs),
                  "failed_seeds": sorted(r["seed"] for r in failed),
                  "failed": failed[0]["failed"],
                  "mean": {key: float("nan") for key, _ in COLUMNS},
                  "std": {key: float("nan") for key, _ in COLUMNS}})
      continue
    rs = sorted(rs, key=lambda r: r["seed"])
    row = {"backbone": backbone, "method": method, "n_seeds": len(rs),
           "seeds": [r["seed"] for r in rs], "mean": {}, "std": {}}
    for key, _ in COLUMNS:
      vals = np.array([r["test"].get(key, np.nan) for r in rs])
      row["mean"][key] = float(vals.mean())
      row["std"][key] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    row["per_seed_ndcg"] = [r["test"]["ndcg"] for r in rs]
    row["under_trained_seeds"] = [r["seed"] for r in rs if r.get("under_trained")]
    # The selected epoch of these seeds warned (e.g. scores collapsed to a constant).
    row["warned_seeds"] = [r["seed"] for r in rs if r.get("warnings")]
    out.append(row)
  for row in out:
    if (is_baseline(row["method"]) or row["method"] == "retriever"
        or row.get("failed")):
      continue
    baselines = [r for r in out if r["backbone"] == row["backbone"]
                 and is_baseline(r["method"]) and not r.get("failed")]
    if not baselines:
      continue
    best = max(baselines, key=lambda r: r["mean"]["ndcg"])
    common = sorted(set(row["seeds"]) & set(best["seeds"]))
    a = [row["per_seed_ndcg"][row["seeds"].index(s)] for s in common]
    b = [best["per_seed_ndcg"][best["seeds"].index(s)] for s in common]
    row["p_vs"], row["p_value"] = best["method"], paired_t_test(a, b)
    row["delta_ndcg"] = float(np.mean(np.subtract(a, b))) if common else float("nan")
  return out


def write_table(summary: list[dict], k: int, path_md: str, path_csv: str,
                title: str, write: bool = True) -> str:
  """Writes the results table as Markdown and CSV (unless not ``write``); returns the
  Markdown."""
  heads = [h.format(k=k) for _, h in COLUMNS]
  lines = [f"### {title}", "",
           "| backbone | method | " + " | ".join(heads)
           + f" | ΔN@{k} vs best baseline (paired t-test p) |",
           "|---|---|" + "---|" * len(heads) + "---|"]
  with open(path_csv if write else os.devnull, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["backbone", "method", "n_seeds"]
               + [x for h in heads for x in (h, h + "_std")]
               + ["p_vs", "delta_ndcg", "p_value"])
    for r in summary:
      cells = [f"{100 * r['mean'][key]:.2f} ± {100 * r['std'][key]:.2f}"
               if not math.isnan(r["mean"][key]) else "-" for key, _ in COLUMNS]
      p = r.get("p_value")
      if r.get("failed"):
        cells = ["FAILED"] * len(COLUMNS)
        seeds = ",".join(str(s) for s in r["failed_seeds"])
        lines.append(f"| {r['backbone']} | {r['method']} | " + " | ".join(cells)
                     + f" | diverged (seed {seeds} of {r['n_seeds']}) |")
        w.writerow([r["backbone"], r["method"], r["n_seeds"]]
                   + ["FAILED", ""] * len(COLUMNS) + ["", "", ""])
        continue
      if p is None:
        p_cell = ""
      else:
        delta = f"{100 * r['delta_ndcg']:+.2f}"
        p_cell = (f"{delta} vs {r['p_vs']} (p = {p:.3g})" if not math.isnan(p)
                  else f"{delta} vs {r['p_vs']} (p n/a: 1 seed)")
      if r.get("warned_seeds"):
        seeds = ",".join(str(s) for s in r["warned_seeds"])
        p_cell = (p_cell + "; " if p_cell else "") + (
            f"WARNING: scores collapsed or not finite (seed {seeds}), see metrics.jsonl")
      lines.append(f"| {r['backbone']} | {r['method']} | " + " | ".join(cells)
                   + f" | {p_cell} |")
      w.writerow([r["backbone"], r["method"], r["n_seeds"]]
                 + [f"{100 * r[s][key]:.4f}" for key, _ in COLUMNS for s in ("mean", "std")]
                 + [r.get("p_vs", ""),
                    "" if p is None else f"{100 * r['delta_ndcg']:.4f}",
                    "" if p is None else p])
  under = [r for r in summary if r.get("under_trained_seeds")]
  if under:
    lines += [""] + [
        f"WARNING: {r['backbone']} / {r['method']}: the best validation epoch is the "
        f"last epoch in seed(s) {', '.join(map(str, r['under_trained_seeds']))}: "
        "possibly under-trained (raise --num_epochs or set --early_stopping_patience)."
        for r in under]
  md = "\n".join(lines) + "\n"
  if write:
    with open(path_md, "w") as f:
      f.write(md)
  return md


def sweep_table(sweep: list[dict], k: int, best: Optional[dict]) -> str:
  """Figure 3 as a Markdown table: test NDCG@K per swept value, mean ± std over seeds."""
  lines = [f"### Sensitivity of {sweep[0]['method']} (Figure 3): test N@{k}, mean ± std",
           ""]
  if best is not None:
    lines += [f"Best baseline ({best['method']}): {100 * best['mean']['ndcg']:.2f} ± "
              f"{100 * best['std']['ndcg']:.2f}", ""]
  lines += ["| field | value | N@{k} | seeds |".format(k=k), "|---|---|---|---|"]
  for field in dict.fromkeys(p["field"] for p in sweep):
    points = [p for p in sweep if p["field"] == field]
    for v in sorted({p["value"] for p in points}):
      n = [p["ndcg"] for p in points if p["value"] == v]
      std = np.std(n, ddof=1) if len(n) > 1 else 0.0
      lines.append(f"| {field} | {v} | {100 * np.mean(n):.2f} ± {100 * std:.2f} | "
                   f"{len(n)} |")
  return "\n".join(lines) + "\n"


def noise_samples(data: types.PreparedLists, noise: config_lib.NoiseConfig,
                  model: config_lib.ModelConfig, generator_params=None,
                  max_lists: int = 2048, seed: int = 0) -> dict[str, np.ndarray]:
  """Figure 5's samples of ``x - z`` on test lists (valid candidates only).

  Returns ``{"real", "gaussian", "beta"}`` and, with ``generator_params``,
  ``"learned"``: the real retriever noise, the two heuristics' (Eq. 4, the config's
  ``lambda_c``) and the trained model generator's.
  """
  arrays = pipeline.complete(data.splits["test"])
  arrays = {k: v[:max_lists] for k, v in arrays.items()}
  b = batch_lib.ListBatch.from_arrays({k: jnp.asarray(v) for k, v in arrays.items()})
  valid = np.asarray(b.mask)
  z = np.asarray(b.labels)
  key = jax.random.PRNGKey(seed)
  out = {"real": (np.asarray(b.scores) - z)[valid]}
  for name in ("gaussian", "beta"):
    x = noise_lib.heuristic_scores(key, b.labels, b.mask,
                                   dataclasses.replace(noise, heuristic=name))
    out[name] = (np.asarray(x) - z)[valid]
  if generator_params is not None:
    gen = noise_lib.make_generator(noise, model)
    x = gen.apply({"params": generator_params}, b, rngs={"noise": key})
    out["learned"] = (np.asarray(x) - z)[valid]
  return out


def _plots(workdir: str, histories: dict, noise: dict, sweep: list[dict],
           baseline: Optional[tuple[str, float]], k: int) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  paths = []
  # Learning curves: validation NDCG@K and the reranker's training loss, seed-mean.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for (backbone, method), hs in sorted(histories.items()):
    epochs = min(len(h) for h in hs)
    ndcg = np.mean([[r["valid"]["ndcg"] for r in h[:epochs]] for h in hs], 0)
    loss = np.mean([[r["train"]["l_direct"] for r in h[:epochs]] for h in hs], 0)
    label = f"{backbone}/{method}"
    axes[0].plot(range(1, epochs + 1), 100 * ndcg, label=label)
    axes[1].plot(range(1, epochs + 1), loss, label=label)
  axes[0].set(xlabel="epoch", ylabel=f"valid NDCG@{k} (%)", title="Learning curves")
  axes[1].set(xlabel="epoch", ylabel="train L_direct")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "plots", "learning_curves.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  # Figure 5: noise densities.
  if noise:
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 81)
    for name, vals in noise.items():
      ax.hist(vals, bins=bins, density=True, histtype="step", label=name, lw=1.5)
    ax.set(xlabel="x - z", ylabel="density",
           title="Retriever noise vs generated noise (Figure 5)")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(workdir, "plots", "noise_density.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  # Figure 3: sensitivity, one panel per swept field, the best baseline as a line.
  fields = list(dict.fromkeys(p["field"] for p in sweep))
  if fields:
    fig, axes = plt.subplots(1, len(fields), figsize=(4.5 * len(fields), 4),
                             squeeze=False)
    for ax, field in zip(axes[0], fields):
      points = [p for p in sweep if p["field"] == field]
      vals = sorted({p["value"] for p in points})
      ndcg = [[p["ndcg"] for p in points if p["value"] == v] for v in vals]
      ax.errorbar(vals, [100 * np.mean(n) for n in ndcg],
                  yerr=[100 * np.std(n) for n in ndcg], marker="o",
                  label=points[0]["method"])
      if baseline is not None:
        ax.axhline(100 * baseline[1], color="gray", ls="--", label=baseline[0])
      ax.set(xlabel=field, ylabel=f"test NDCG@{k} (%)", title=f"Sensitivity: {field}")
      ax.legend(fontsize=7)
    fig.suptitle("Figure 3: sensitivity (mean ± std over seeds)")
    fig.tight_layout()
    paths.append(os.path.join(workdir, "plots", "sensitivity.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


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
                  "ndcg": result["test"]["ndcg"]})

  summary = summarize(rows, k)
  title = (f"{data.name}: test metrics (%) at the best validation epoch, mean ± std "
           f"over {len(experiment.seeds)} seed(s)")
  if not data.is_real:
    title += " -- NOT the real data"
  md = write_table(summary, k, os.path.join(workdir, "results.md"),
                   os.path.join(workdir, "results.csv"), title, write=primary)
  baselines = [r for r in summary if r["backbone"] == experiment.backbones[0]
               and is_baseline(r["method"]) and not r.get("failed")]
  best = max(baselines, key=lambda r: r["mean"]["ndcg"]) if baselines else None
  if sweep:
    md += "\n" + sweep_table(sweep, k, best)
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
    noise = noise_samples(data, cfg0.noise, model_cfg,
                          learned[1] if learned else None)
    outputs += _plots(workdir, histories, noise, sweep,
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
