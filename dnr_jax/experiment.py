"""The paper's experiment protocol: methods x backbones x seeds, tables and plots.

``run_experiment(experiment, data, workdir)`` trains every (backbone, method, seed)
with ``train.train_and_evaluate`` (model selection on validation NDCG@K, numbers on
test), then writes

* ``runs/<backbone>/<method>/seed<s>/``: ``metrics.jsonl``, TensorBoard event files
  (``tb/``, written with tensorboardX: no TensorFlow needed), orbax checkpoints;
* ``results.md`` and ``results.csv``: mean +- std over seeds of HR/NDCG/MAP/F1@K and
  AUC, in percent, with the retriever's own ranking as a row, and the paired t-test
  p-value (over seeds) of each DNR row against the best baseline of its backbone;
* ``plots/``: learning curves, the paper's Figure 5 (density of real retriever noise
  ``x - z`` beside Gaussian, Beta and the learned generator's ``x' - z``) and, with a
  sweep, Figure 3 (sensitivity to one hyper-parameter).
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
from dnr_jax import noise as noise_lib
from dnr_jax import pipeline
from dnr_jax import train
from dnr_jax.data import types

# (key in the metrics dicts, column header)
COLUMNS = (("hr", "H@{k}"), ("ndcg", "N@{k}"), ("map", "M@{k}"), ("f1", "F1@{k}"),
           ("global_auc", "AUC"))
DNR_METHODS = ("dnr_g", "dnr_b", "dnr_g_no_adv", "dnr_g_no_lx")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """What to run.

  Attributes:
    base: the training configuration every run starts from.
    overrides: dotted-key overrides (``config.with_overrides``) for every run, except
      the fields a method's preset fixes (``config.METHODS``): those define the table
      row, so ``--lambda_m=0.6`` sets DNR's L_z weight but leaves ``c_score`` without
      L_z, and ``--score_usage`` reaches only methods that do not fix it.
    methods: ``config.METHODS`` names, the table's rows.
    backbones: reranker backbones; every method runs on each.
    seeds: one run per seed; the table reports mean +- std over them.
    sweep_field / sweep_values: Figure 3, e.g. ``"noise.lambda_c"`` over values;
      ``sweep_method`` is run on the first backbone for each value and seed.
    plots: write the PNG plots.
  """
  base: config_lib.TrainConfig
  overrides: tuple[tuple[str, Any], ...] = ()
  methods: tuple[str, ...] = ("backbone", "c_score", "dnr_g")
  backbones: tuple[str, ...] = ("prm",)
  seeds: tuple[int, ...] = (0, 1, 2)
  sweep_field: Optional[str] = None
  sweep_values: tuple[float, ...] = ()
  sweep_method: str = "dnr_g"
  plots: bool = True


def run_config(experiment: ExperimentConfig, method: str, backbone: str, seed: int,
               extra: Optional[dict] = None, vocab: bool = True
               ) -> config_lib.TrainConfig:
  """The resolved config of one run: base, method preset, overrides, run identity."""
  cfg = config_lib.with_overrides(experiment.base,
                                  dict(experiment.overrides, **(extra or {})))
  # The preset last: a row of the table is what its method says, whatever the flags.
  cfg = config_lib.apply_method(cfg, method)
  cfg = dataclasses.replace(cfg, seed=seed,
                            model=dataclasses.replace(cfg.model, backbone=backbone))
  config_lib.validate(cfg, vocab=vocab)
  return cfg


def validate(experiment: ExperimentConfig) -> None:
  """Fails at once, naming the value, for any run the experiment would start."""
  if not experiment.methods or not experiment.backbones or not experiment.seeds:
    raise ValueError("an experiment needs at least one method, backbone and seed")
  for m in experiment.methods:
    for b in experiment.backbones:
      run_config(experiment, m, b, experiment.seeds[0], vocab=False)
  if experiment.sweep_field:
    if not experiment.sweep_values:
      raise ValueError(f"sweep_field={experiment.sweep_field!r} needs sweep_values")
    for v in experiment.sweep_values:
      run_config(experiment, experiment.sweep_method, experiment.backbones[0],
                 experiment.seeds[0], {experiment.sweep_field: v}, vocab=False)


class _TensorBoard:
  """Per-epoch scalars as TensorBoard event files (tensorboardX, no TensorFlow)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(logdir)

  def __call__(self, record: dict) -> None:
    for split in ("train", "valid", "test"):
      for k, v in record[split].items():
        self.writer.add_scalar(f"{split}/{k}", v, record["epoch"])
    self.writer.add_scalar("lists_per_s", record["lists_per_s"], record["epoch"])
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def _run_one(cfg: config_lib.TrainConfig, data: types.PreparedLists, run_dir: str):
  tb = _TensorBoard(os.path.join(run_dir, "tb"))
  try:
    result = train.train_and_evaluate(cfg, data, run_dir, on_epoch=tb)
  finally:
    tb.close()
  with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({k: result[k] for k in ("best_epoch", "valid", "test", "retriever")}, f,
              indent=2)
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
    and for DNR methods ``p_vs`` (the best baseline's name) and ``p_value`` (on NDCG).
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["backbone"], r["method"]), []).append(r)
  out = []
  for (backbone, method), rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    row = {"backbone": backbone, "method": method, "n_seeds": len(rs),
           "seeds": [r["seed"] for r in rs], "mean": {}, "std": {}}
    for key, _ in COLUMNS:
      vals = np.array([r["test"][key] for r in rs])
      row["mean"][key] = float(vals.mean())
      row["std"][key] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    row["per_seed_ndcg"] = [r["test"]["ndcg"] for r in rs]
    out.append(row)
  for row in out:
    if row["method"] not in DNR_METHODS:
      continue
    baselines = [r for r in out if r["backbone"] == row["backbone"]
                 and r["method"] not in DNR_METHODS and r["method"] != "retriever"]
    if not baselines:
      continue
    best = max(baselines, key=lambda r: r["mean"]["ndcg"])
    common = sorted(set(row["seeds"]) & set(best["seeds"]))
    a = [row["per_seed_ndcg"][row["seeds"].index(s)] for s in common]
    b = [best["per_seed_ndcg"][best["seeds"].index(s)] for s in common]
    row["p_vs"], row["p_value"] = best["method"], paired_t_test(a, b)
  return out


def write_table(summary: list[dict], k: int, path_md: str, path_csv: str,
                title: str) -> str:
  """Writes the results table as Markdown and CSV; returns the Markdown."""
  heads = [h.format(k=k) for _, h in COLUMNS]
  lines = [f"### {title}", "",
           "| backbone | method | " + " | ".join(heads) + " | p (NDCG) vs best baseline |",
           "|---|---|" + "---|" * len(heads) + "---|"]
  with open(path_csv, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["backbone", "method", "n_seeds"]
               + [x for h in heads for x in (h, h + "_std")] + ["p_vs", "p_value"])
    for r in summary:
      cells = [f"{100 * r['mean'][key]:.2f} ± {100 * r['std'][key]:.2f}"
               for key, _ in COLUMNS]
      p = r.get("p_value")
      p_cell = "" if p is None else (f"{p:.3g} vs {r['p_vs']}"
                                     if not math.isnan(p) else "n/a (1 seed)")
      lines.append(f"| {r['backbone']} | {r['method']} | " + " | ".join(cells)
                   + f" | {p_cell} |")
      w.writerow([r["backbone"], r["method"], r["n_seeds"]]
                 + [f"{100 * r[s][key]:.4f}" for key, _ in COLUMNS for s in ("mean", "std")]
                 + [r.get("p_vs", ""), "" if p is None else p])
  md = "\n".join(lines) + "\n"
  with open(path_md, "w") as f:
    f.write(md)
  return md


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


def _plots(workdir: str, rows: list[dict], histories: dict, noise: dict,
           sweep: list[dict], sweep_field: Optional[str], k: int) -> list[str]:
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
  # Figure 3: sensitivity.
  if sweep:
    vals = sorted({s["value"] for s in sweep})
    means = [np.mean([s["ndcg"] for s in sweep if s["value"] == v]) for v in vals]
    stds = [np.std([s["ndcg"] for s in sweep if s["value"] == v]) for v in vals]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar(vals, 100 * np.array(means), yerr=100 * np.array(stds), marker="o")
    ax.set(xlabel=sweep_field, ylabel=f"test NDCG@{k} (%)",
           title=f"Sensitivity to {sweep_field} (Figure 3)")
    fig.tight_layout()
    paths.append(os.path.join(workdir, "plots", f"sensitivity_{sweep_field}.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


def run_experiment(experiment: ExperimentConfig, data: types.PreparedLists,
                   workdir: str) -> dict[str, Any]:
  """Runs every (backbone, method, seed), then the sweep; writes tables and plots.

  Returns:
    ``{"summary": table rows, "table": Markdown, "outputs": paths, "sweep": ...}``.
  """
  validate(experiment)
  experiment = dataclasses.replace(
      experiment, base=train.with_data_vocab(experiment.base, data))
  os.makedirs(workdir, exist_ok=True)
  jobs = [(b, m, s) for b in experiment.backbones for m in experiment.methods
          for s in experiment.seeds]
  sweep_jobs = [(v, s) for v in experiment.sweep_values for s in experiment.seeds] \
      if experiment.sweep_field else []
  total = len(jobs) + len(sweep_jobs)
  t0 = time.time()
  rows, histories, learned = [], {}, None
  k = experiment.base.eval_k
  retriever = None
  for i, (backbone, method, seed) in enumerate(jobs):
    cfg = run_config(experiment, method, backbone, seed)
    logging.info("=== run %d/%d: backbone=%s method=%s seed=%d (%.0fs elapsed)",
                 i + 1, total, backbone, method, seed, time.time() - t0)
    run_dir = os.path.join(workdir, "runs", backbone, method, f"seed{seed}")
    result = _run_one(cfg, data, run_dir)
    rows.append({"backbone": backbone, "method": method, "seed": seed,
                 "test": result["test"], "valid": result["valid"],
                 "best_epoch": result["best_epoch"]})
    histories.setdefault((backbone, method), []).append(result["history"])
    retriever = result["retriever"]
    if learned is None and method in DNR_METHODS and config_lib.generator_active(
        cfg, cfg.num_epochs - 1):
      learned = (cfg, result["final_state"].generator.params)
  rows.append({"backbone": "-", "method": "retriever", "seed": 0, "test": retriever})
  sweep = []
  for j, (value, seed) in enumerate(sweep_jobs):
    cfg = run_config(experiment, experiment.sweep_method, experiment.backbones[0], seed,
                     {experiment.sweep_field: value})
    logging.info("=== run %d/%d: sweep %s=%s seed=%d", len(jobs) + j + 1, total,
                 experiment.sweep_field, value, seed)
    run_dir = os.path.join(workdir, "sweep", f"{experiment.sweep_field}={value}",
                           f"seed{seed}")
    result = _run_one(cfg, data, run_dir)
    sweep.append({"value": value, "seed": seed, "ndcg": result["test"]["ndcg"]})

  summary = summarize(rows, k)
  title = (f"{data.name}: test metrics (%) at the best validation epoch, mean ± std "
           f"over {len(experiment.seeds)} seed(s)")
  if not data.is_real:
    title += " -- NOT the real data"
  md = write_table(summary, k, os.path.join(workdir, "results.md"),
                   os.path.join(workdir, "results.csv"), title)
  outputs = [os.path.join(workdir, "results.md"), os.path.join(workdir, "results.csv")]
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"summary": summary, "runs": rows, "sweep": sweep,
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
    outputs += _plots(workdir, rows, histories, noise, sweep, experiment.sweep_field, k)
  logging.info("done: %d runs in %.0fs; outputs:\n  %s", total, time.time() - t0,
               "\n  ".join(outputs))
  return {"summary": summary, "table": md, "outputs": outputs, "sweep": sweep}
