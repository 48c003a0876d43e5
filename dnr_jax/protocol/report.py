"""The results tables: mean +- std over seeds, paired t-tests against a baseline.

``summarize`` aggregates per-seed runs into table rows; ``write_table`` writes them
as Markdown and CSV; ``sweep_table`` is Figure 3 as a table. Standard deviations are
over seeds with ``ddof=1`` (the sample std), and are shown only with two seeds or
more: one seed has no spread to show.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Optional, Sequence

import numpy as np

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


def is_baseline(spec: str) -> bool:
  """Whether the table row ``spec`` is a baseline (no generated scores)."""
  return spec in BASELINES


def _mean_std(mean: float, std: float, n: int) -> str:
  return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


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
                title: str, write: bool = True, *,
                columns: Optional[Sequence[str]] = None, p_values: bool = True
                ) -> str:
  """Writes the results table as Markdown and CSV (unless not ``write``); returns the
  Markdown.

  ``columns`` (metric keys of ``COLUMNS``, default all) and ``p_values`` (the
  ΔN@K-vs-best-baseline column) leave out what a table cannot fill: a table of one
  model against the upstream order (``serving.rerank_files``) has no baseline to
  test against, and no shuffled-scores run.
  """
  shown = [(key, head) for key, head in COLUMNS
           if columns is None or key in columns]
  heads = [h.format(k=k) for _, h in shown]
  lines = [f"### {title}", "",
           "| backbone | method | " + " | ".join(heads)
           + (f" | ΔN@{k} vs best baseline (paired t-test p) |" if p_values else " |"),
           "|---|---|" + "---|" * len(heads) + ("---|" if p_values else "")]
  notes = []
  with open(path_csv if write else os.devnull, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["backbone", "method", "n_seeds"]
               + [x for h in heads for x in (h, h + "_std")]
               + (["p_vs", "delta_ndcg", "p_value"] if p_values else []))
    for r in summary:
      cells = [_mean_std(r["mean"][key], r["std"][key], r["n_seeds"])
               if not math.isnan(r["mean"][key]) else "-" for key, _ in shown]
      p = r.get("p_value")
      if r.get("failed"):
        cells = ["FAILED"] * len(shown)
        seeds = ",".join(str(s) for s in r["failed_seeds"])
        failed = f"diverged (seed {seeds} of {r['n_seeds']})"
        lines.append(f"| {r['backbone']} | {r['method']} | " + " | ".join(cells)
                     + (f" | {failed} |" if p_values else " |"))
        if not p_values:
          notes.append(f"FAILED: {r['backbone']} / {r['method']}: {failed}")
        w.writerow([r["backbone"], r["method"], r["n_seeds"]]
                   + ["FAILED", ""] * len(shown) + (["", "", ""] if p_values else []))
        continue
      if p is None:
        p_cell = ""
      else:
        delta = f"{100 * r['delta_ndcg']:+.2f}"
        p_cell = (f"{delta} vs {r['p_vs']} (p = {p:.3g})" if not math.isnan(p)
                  else f"{delta} vs {r['p_vs']} (p n/a: 1 seed)")
      if r.get("warned_seeds"):
        seeds = ",".join(str(s) for s in r["warned_seeds"])
        warning = (f"WARNING: scores collapsed or not finite (seed {seeds}), see "
                   "metrics.jsonl")
        if p_values:
          p_cell = (p_cell + "; " if p_cell else "") + warning
        else:
          notes.append(f"{r['backbone']} / {r['method']}: {warning}")
      lines.append(f"| {r['backbone']} | {r['method']} | " + " | ".join(cells)
                   + (f" | {p_cell} |" if p_values else " |"))
      w.writerow([r["backbone"], r["method"], r["n_seeds"]]
                 + [f"{100 * r[s][key]:.4f}" for key, _ in shown for s in ("mean", "std")]
                 + ([r.get("p_vs", ""),
                     "" if p is None else f"{100 * r['delta_ndcg']:.4f}",
                     "" if p is None else p] if p_values else []))
  under = [r for r in summary if r.get("under_trained_seeds")]
  notes += [
      f"WARNING: {r['backbone']} / {r['method']}: the best validation epoch is the "
      f"last epoch in seed(s) {', '.join(map(str, r['under_trained_seeds']))}: "
      "possibly under-trained (raise --num_epochs or set --early_stopping_patience)."
      for r in under]
  if notes:
    lines += [""] + notes
  md = "\n".join(lines) + "\n"
  if write:
    with open(path_md, "w") as f:
      f.write(md)
  return md


def sweep_table(sweep: list[dict], k: int, best: Optional[dict]) -> str:
  """Figure 3 as a Markdown table: NDCG@K per swept value, mean ± std over seeds.

  The validation column is the one to choose a value by; the test column is what
  that choice gives. Points from files written before they carried a validation
  score show "-" there.
  """
  lines = [f"### Sensitivity of {sweep[0]['method']} (Figure 3): N@{k} at the best "
           "validation epoch, mean ± std over seeds",
           ""]
  if best is not None:
    lines += [f"Best baseline ({best['method']}, test): "
              f"{_mean_std(best['mean']['ndcg'], best['std']['ndcg'], best['n_seeds'])}",
              ""]
  lines += [f"| field | value | valid N@{k} | test N@{k} | best epoch | seeds |",
            "|---|---|---|---|---|---|"]
  for field in dict.fromkeys(p["field"] for p in sweep):
    points = [p for p in sweep if p["field"] == field]
    for v in sorted({p["value"] for p in points}):
      at = [p for p in points if p["value"] == v]
      cells = []
      for key in ("valid_ndcg", "ndcg"):
        n = [p[key] for p in at if key in p]
        std = np.std(n, ddof=1) if len(n) > 1 else 0.0
        cells.append(_mean_std(np.mean(n), std, len(n)) if n else "-")
      epochs = ", ".join(str(p["best_epoch"]) for p in at if "best_epoch" in p) or "-"
      mark = " (configured)" if any(p.get("base") for p in at) else ""
      lines.append(f"| {field} | {v}{mark} | {cells[0]} | {cells[1]} | {epochs} | "
                   f"{len(at)} |")
  return "\n".join(lines) + "\n"
