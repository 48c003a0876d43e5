"""One table from several experiment runs: seeds run in separate sessions, combined.

A table of five seeds of real data can take longer than one session (or one batch
job) allows, so its runs are made a few at a time, each ``run_experiment`` writing
its own ``results.json``. ``combine`` reads them, checks that they describe the same
experiment, and builds the table (``report.summarize``: mean ± std over every seed,
the paired t-tests) as if one run had made them all.

What "the same experiment" means: the same data set (name and preparation report),
and for each table row the same configuration in every file except the seed, compared
after ``config.from_dict`` fills the defaults of fields an older file lacks. A field
known not to matter for some runs (say, a minimum epoch count that those runs passed
anyway) can be named in ``ignore_fields``; the combined results record it. A run
given twice (the same backbone, method and seed) is taken from the file given last:
a re-run replaces the first one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from dnr_jax import config as config_lib
from dnr_jax.errors import ConfigError
from dnr_jax.protocol import report


def _load(path: str) -> dict:
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read the results ({e})") from e
  if not isinstance(d, dict) or "runs" not in d or "data" not in d:
    raise ConfigError(f"{path}: not a results.json of run_experiment (no runs / data)")
  return d


def _normalised(config: dict, where: str) -> dict[str, Any]:
  cfg = config_lib.from_dict(config, where=where)
  flat = config_lib.flatten(config_lib.to_dict(cfg))
  flat.pop("seed", None)
  return flat


def combine(paths: Sequence[str], *, ignore_fields: Sequence[str] = ()
            ) -> dict[str, Any]:
  """The runs of several ``results.json`` files as one experiment's results.

  Args:
    paths: the files, in order (a run given twice is taken from the later file).
    ignore_fields: dotted config fields allowed to differ between the runs of a row.

  Returns:
    ``{"runs", "summary", "data", "sources", "ignored_fields", "k"}``: the runs
    (one per backbone, method and seed, then the retriever's row), the table rows of
    ``report.summarize``, the data set's entry, and for each run the file it came
    from.

  Raises:
    ConfigError: a file is unreadable, the files are of different data, or a row's
      runs differ in a configuration field (named, with the two values and files).
  """
  if not paths:
    raise ConfigError("no results files to combine")
  data, runs, sources, retriever = None, {}, {}, None
  for path in paths:
    d = _load(path)
    name = d["data"].get("name")
    # What the preparation produced, not how long it took.
    report_ = {k: v for k, v in config_lib.flatten(d["data"].get("report") or {}).items()
               if "seconds" not in k}
    if data is None:
      data, data_name, data_report, first = d["data"], name, report_, path
    elif name != data_name:
      raise ConfigError(f"{path}: another data set than {first} ({name!r} vs "
                        f"{data_name!r}); only runs on the same prepared data "
                        "combine into one table")
    elif report_ != data_report:
      k = sorted(k for k in set(report_) | set(data_report)
                 if report_.get(k) != data_report.get(k))[0]
      raise ConfigError(f"{path}: another data set than {first} (its preparation "
                        f"report differs, first in {k}: {report_.get(k)!r} vs "
                        f"{data_report.get(k)!r}); only runs on the same prepared "
                        "data combine into one table")
    for r in d["runs"]:
      if r.get("method") == "retriever":
        retriever = r
        continue
      try:
        ident = (r["backbone"], r["method"], int(r["seed"]))
      except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: a run without backbone / method / seed ({e})"
                          ) from e
      runs[ident] = r
      sources[ident] = path
  ignore = set(ignore_fields)
  rows: dict[tuple, list] = {}
  for ident, r in runs.items():
    if "config" in r and not r.get("failed"):
      rows.setdefault(ident[:2], []).append(
          (ident, _normalised(r["config"], f"{sources[ident]}: {ident}")))
  for (backbone, method), members in rows.items():
    (ident0, cfg0), *rest = members
    for ident, cfg in rest:
      differ = sorted(k for k in set(cfg0) | set(cfg)
                      if k not in ignore and cfg0.get(k) != cfg.get(k))
      if differ:
        k = differ[0]
        raise ConfigError(
            f"{backbone}/{method}: seed {ident0[2]} ({sources[ident0]}) and seed "
            f"{ident[2]} ({sources[ident]}) differ in {len(differ)} config field(s), "
            f"first {k}: {cfg0.get(k)!r} vs {cfg.get(k)!r} (all: {differ}); re-run "
            "one, or name the field in ignore_fields (--ignore_config) if it did not "
            "matter")
  k = next((r["config"]["eval_k"] for r in runs.values() if "config" in r), 6)
  # Rows in the order their methods first appear in the files, the retriever last.
  method_order = list(dict.fromkeys(i[1] for i in runs))
  ordered = [runs[i] for i in sorted(
      runs, key=lambda i: (i[0], method_order.index(i[1]), i[2]))]
  if retriever is not None:
    ordered.append(retriever)
  return {"runs": ordered, "summary": report.summarize(ordered, k), "data": data,
          "sources": {f"{b}/{m}/seed{s}": p for (b, m, s), p in sources.items()},
          "ignored_fields": sorted(ignore), "k": k}


def write(combined: dict, directory: str, title: str) -> str:
  """Writes ``results.md``, ``results.csv`` and ``results.json`` of ``combined``;
  returns the Markdown table."""
  target = os.path.abspath(os.path.join(directory, "results.json"))
  if target in {os.path.abspath(p) for p in combined["sources"].values()}:
    raise ConfigError(f"{directory}: holds one of the combined results.json files; "
                      "write the combined table into another folder")
  os.makedirs(directory, exist_ok=True)
  summary = combined["summary"]
  seeds = sorted({r["n_seeds"] for r in summary if r["method"] != "retriever"})
  span = (f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''}" if len(seeds) == 1 else
          f"{seeds[0]}-{seeds[-1]} seeds per row")
  full = f"{title}: test metrics (%) at the best validation epoch, mean ± std, {span}"
  if not combined["data"].get("is_real", True):
    full += " -- NOT the real data"
  md = report.write_table(summary, combined["k"], os.path.join(directory, "results.md"),
                          os.path.join(directory, "results.csv"), full)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump(combined, f, indent=2, default=str)
  return md
