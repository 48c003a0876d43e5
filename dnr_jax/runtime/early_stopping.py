"""Training to convergence: model selection and early stopping on the validation metric.

The paper trains "until convergence" (with a heuristic warm-up λ_e of up to 200
epochs); a fixed epoch budget reports an under-trained model whenever the best
validation epoch is the last one. ``status`` decides, from the per-epoch history
alone, which epoch is selected and whether to stop:

* **selection**: the epoch with the highest validation metric (the first of equal
  ones), as without early stopping; its test numbers and parameters are reported;
* **stopping**: after ``patience`` epochs in a row without an improvement of more
  than ``min_delta`` over the best value so far (``patience=0``: never; the run then
  trains ``num_epochs``, which is always the maximum);
* **warm-up**: a method whose model generator switches on after ``warmup_epochs``
  (Algorithm 1) never stops before it has trained ``patience`` epochs with it, or a
  plateau of the heuristic warm-up would silently turn DNR into its heuristic-only row;
* **a minimum for every method** (``early_stopping_min_epochs``): no run stops
  before that epoch, so that rows whose first epochs plateau train as long as the
  DNR rows beside them must.

Being a function of the history (which every checkpoint's metadata holds), the state
survives a restart without being stored separately.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from dnr_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Status:
  """Where training stands after the epochs of a history.

  Attributes:
    best_epoch: the selected epoch (1-based; 0 for an empty history).
    best_value: its validation metric.
    stale_epochs: epochs since the last improvement by more than ``min_delta``.
    stop: whether training stops now (early stop, or ``num_epochs`` reached).
    reason: why it stops, in words ('' while it goes on).
    under_trained: the run used up ``num_epochs`` and its best epoch is the last
      one: it was still improving, so its numbers understate the method.
  """
  best_epoch: int
  best_value: float
  stale_epochs: int
  stop: bool
  reason: str
  under_trained: bool


def min_epochs(config: config_lib.TrainConfig) -> int:
  """Epochs before early stopping may stop ``config``'s run (see module docstring)."""
  uses_generator = config_lib.generator_active(config, max(config.num_epochs - 1, 0))
  warmup = config.warmup_epochs + config.early_stopping_patience if uses_generator else 0
  return max(warmup, config.early_stopping_min_epochs)


def status(history: Sequence[dict], config: config_lib.TrainConfig, *,
           metric: str = "ndcg") -> Status:
  """The selection and stopping state after ``history`` (``train``'s epoch records).

  Args:
    history: per-epoch records with ``record["valid"][metric]``, in epoch order.
    config: ``early_stopping_patience``, ``early_stopping_min_delta``,
      ``num_epochs`` and the schedule (``warmup_epochs``) are read.
    metric: the validation metric, higher is better.

  Returns:
    The ``Status``.
  """
  patience, delta = config.early_stopping_patience, config.early_stopping_min_delta
  best_epoch, best_value = 0, -math.inf
  ref, last_gain = -math.inf, 0
  for i, record in enumerate(history, 1):
    value = record["valid"][metric]
    # A non-finite metric is stored as null in the history: never an improvement.
    value = -math.inf if value is None or not math.isfinite(value) else float(value)
    if value > best_value or best_epoch == 0:
      best_epoch, best_value = i, value
    if value > ref + delta:
      ref, last_gain = value, i
  n = len(history)
  stale = n - last_gain
  reason, under_trained = "", False
  if patience and stale >= patience and n >= min_epochs(config) and n < config.num_epochs:
    reason = (f"early stop after epoch {n}: valid {metric}@{config.eval_k} has not "
              f"improved by more than {delta:g} for {stale} epochs "
              f"(patience {patience}); best epoch {best_epoch}")
  elif n >= config.num_epochs:
    reason = f"reached the maximum of {config.num_epochs} epochs; best epoch {best_epoch}"
    under_trained = best_epoch == n
    if under_trained:
      reason += " is the last: the model may be under-trained (raise num_epochs)"
  return Status(best_epoch=best_epoch, best_value=best_value, stale_epochs=stale,
                stop=bool(reason), reason=reason, under_trained=under_trained)
