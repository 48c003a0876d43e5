"""Tests of early stopping's selection and stopping rule on hand-written histories."""

import dataclasses

import pytest

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax.runtime import early_stopping


def _history(values):
  return [{"epoch": i, "valid": {"ndcg": v}} for i, v in enumerate(values, 1)]


def _cfg(method="c_score", **kw):
  return dataclasses.replace(config_lib.apply_method(config_lib.TrainConfig(
      warmup_epochs=3, num_epochs=20, early_stopping_patience=2), method), **kw)


def test_stops_after_patience_epochs_without_improvement():
  s = early_stopping.status(_history([0.5, 0.6, 0.59]), _cfg())
  assert (s.best_epoch, s.stale_epochs, s.stop) == (2, 1, False)
  s = early_stopping.status(_history([0.5, 0.6, 0.59, 0.58]), _cfg())
  assert (s.best_epoch, s.stale_epochs, s.stop) == (2, 2, True)
  assert s.reason.startswith("early stop after epoch 4") and "best epoch 2" in s.reason
  assert not s.under_trained


def test_min_delta_gains_do_not_reset_patience_but_are_selected():
  # +0.0005 twice: below min_delta, so the run stops; the selected epoch is still
  # the best value seen (epoch 3), as without early stopping.
  cfg = _cfg(early_stopping_min_delta=0.001)
  s = early_stopping.status(_history([0.6, 0.6005, 0.601]), cfg)
  assert (s.best_epoch, s.stale_epochs, s.stop) == (3, 2, True)
  s = early_stopping.status(_history([0.6, 0.6005, 0.6020]), cfg)
  assert (s.best_epoch, s.stale_epochs, s.stop) == (3, 0, False)


def test_patience_zero_trains_every_epoch_and_flags_under_training():
  cfg = _cfg(early_stopping_patience=0, num_epochs=4)
  assert not early_stopping.status(_history([0.5, 0.4, 0.3]), cfg).stop
  s = early_stopping.status(_history([0.5, 0.4, 0.3, 0.6]), cfg)
  assert s.stop and s.under_trained and s.best_epoch == 4
  assert "reached the maximum of 4 epochs" in s.reason and "under-trained" in s.reason
  s = early_stopping.status(_history([0.5, 0.7, 0.3, 0.6]), cfg)
  assert s.stop and not s.under_trained and s.best_epoch == 2


@pytest.mark.parametrize("method, first_stop", [("c_score", 3), ("heuristic_g", 3),
                                                ("dnr_g", 5)])
def test_dnr_never_stops_before_its_generator_trained_patience_epochs(method,
                                                                      first_stop):
  # Flat validation from epoch 1: the baselines and the heuristic-only row stop at
  # 1 + patience; DNR (warm-up 3) only after warm-up + patience epochs.
  cfg = _cfg(method)
  stops = [early_stopping.status(_history([0.5] * n), cfg).stop for n in range(1, 8)]
  assert stops.index(True) == first_stop - 1


def test_bad_values_are_rejected():
  with pytest.raises(ValueError, match="early_stopping_patience=-1"):
    config_lib.validate(_cfg(early_stopping_patience=-1), vocab=False)
  with pytest.raises(ValueError, match="early_stopping_min_delta=-0.1"):
    config_lib.validate(_cfg(early_stopping_min_delta=-0.1), vocab=False)


def test_no_method_stops_before_the_minimum_epochs():
  flat = _history([0.5] + [0.4] * 9)   # best at epoch 1, then a plateau
  assert early_stopping.status(flat[:3], _cfg()).stop
  cfg = _cfg(early_stopping_min_epochs=6)
  assert [early_stopping.status(flat[:n], cfg).stop for n in (3, 5, 6)] == [
      False, False, True]
  # A DNR run keeps the larger of its own minimum (warm-up + patience) and this one.
  assert early_stopping.min_epochs(_cfg("dnr_g", early_stopping_min_epochs=2)) == 5
  assert early_stopping.min_epochs(_cfg("dnr_g", early_stopping_min_epochs=9)) == 9


def test_a_negative_minimum_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="early_stopping_min_epochs=-1"):
    config_lib.validate(_cfg(early_stopping_min_epochs=-1), vocab=False)
