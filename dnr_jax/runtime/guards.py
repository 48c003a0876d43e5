"""Host-side guards against silent wrong results: non-finite steps, collapse, JSON.

The compiled step (``step.train_step``) flags every step whose loss or gradient
norm is not finite and does not apply it (metric ``nonfinite``); this module turns
those flags into an epoch's ``skipped_steps`` and into ``errors.TrainingDiverged``
with the epoch, the step and the likely cause. It also spots a reranker that
collapsed to constant scores (a warning, not an error: the run is finite, but its
rankings fall back to tie-breaking, i.e. the retriever's order) and makes records
valid JSON (NaN and inf become null: ``json.dumps(allow_nan=False)`` holds).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from dnr_jax import errors

# Validation logits whose spread within lists is below this fraction of their size
# are "constant": a trained reranker's per-list std is a sizeable fraction of its
# logits (measured: about 1 for logits of order 1 on the synthetic lists), while a
# run blown up by a huge learning rate gives logits of order 1e8 that differ only by
# float32 rounding (relative spread about 1e-8: ties everywhere).
COLLAPSE_SPREAD = 1e-4


def json_safe(value: Any) -> Any:
  """``value`` with every non-finite float replaced by None (and numpy scalars by Python)."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return json_safe(value.item())
  return value


def dumps(record: dict) -> str:
  """One JSON line: non-finite numbers as null, never a bare NaN."""
  return json.dumps(json_safe(record), allow_nan=False)


def write_jsonl(path: str, records: Sequence[dict]) -> None:
  """Replaces ``path`` with one line per record, atomically (a kill leaves old or new)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(dumps(r) + "\n")
  os.replace(tmp, path)


def epoch_train_metrics(steps: Sequence[dict]) -> dict[str, float]:
  """An epoch's train metrics: the mean of each term over its applied steps.

  ``steps`` are the host metrics of the epoch's steps (each with ``nonfinite``, 1.0
  for a step the guard did not apply). Skipped steps are left out of the means and
  counted in ``skipped_steps``; a term with no applied step is NaN.
  """
  skipped = np.asarray([m.get("nonfinite", 0.0) for m in steps], np.float32) > 0
  out: dict[str, float] = {}
  for k in steps[0]:
    if k == "nonfinite":
      continue
    vals = np.asarray([m[k] for m in steps], np.float32)[~skipped]
    out[k] = float(np.mean(vals)) if vals.size else float("nan")
  out["skipped_steps"] = int(skipped.sum())
  return out


def first_nonfinite(steps: Sequence[dict]) -> Optional[int]:
  """The index of the first step the guard did not apply, or None."""
  for i, m in enumerate(steps):
    if float(m.get("nonfinite", 0.0)) > 0:
      return i
  return None


def diverged(config, epoch: int, step: int, steps: int, metrics: dict,
             reason: str = "") -> errors.TrainingDiverged:
  """The one-line error of a run whose step ``step`` (0-based) went non-finite."""
  shown = ", ".join(f"{k}={float(metrics[k]):.4g}" for k in
                    ("l_theta", "grad_norm_theta", "l_phi", "grad_norm_phi")
                    if k in metrics)
  return errors.TrainingDiverged(
      f"training diverged at epoch {epoch + 1} step {step + 1}/{steps}{reason}: "
      f"non-finite loss or gradient ({shown}); the learning rate is likely too high "
      f"(learning_rate={config.learning_rate:g}, "
      f"generator_learning_rate={config.generator_learning_rate:g}): lower it, or "
      "set nonfinite=skip (--nonfinite=skip) to skip such steps")


def logit_spread(logits, mask) -> float:
  """Mean over lists (>= 2 valid candidates) of ``std / (|mean| + 1)`` of the valid logits.

  Relative to the logits' size, so that logits of order 1e8 that differ only by
  float32 rounding count as constant (the ``+ 1`` keeps logits near 0 absolute).
  """
  logits, mask = np.asarray(logits, np.float64), np.asarray(mask, bool)
  x = np.where(mask, logits, 0.0)
  n = mask.sum(1)
  mean = x.sum(1) / np.maximum(n, 1)
  var = (np.where(mask, logits - mean[:, None], 0.0) ** 2).sum(1) / np.maximum(n, 1)
  keep = n >= 2
  if not keep.any():
    return float("nan")
  return float((np.sqrt(var[keep]) / (np.abs(mean[keep]) + 1.0)).mean())


def collapse_warning(valid_metrics: dict) -> Optional[str]:
  """A warning if validation scores are constant within lists (or not finite)."""
  spread = valid_metrics.get("logit_spread")
  if spread is None:
    return None
  if not math.isfinite(spread):
    return "the reranker's validation scores are not finite"
  if spread < COLLAPSE_SPREAD:
    return (f"the reranker collapsed to constant scores (validation per-list logit "
            f"spread std/(|mean|+1) = {spread:.2g} < {COLLAPSE_SPREAD:g}): rankings "
            "fall back to the retriever's order; the learning rate may be too high")
  return None
