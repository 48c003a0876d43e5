"""Tests that bad configuration values fail at start, naming the value."""

import dataclasses

import pytest

from dnr_jax import config as config_lib


def _cfg(**kw):
  return dataclasses.replace(config_lib.TrainConfig(
      model=config_lib.ModelConfig(num_items=10, num_users=3)), **kw)


def test_default_config_is_valid():
  config_lib.validate(_cfg(), list_size=50, num_devices=8)


@pytest.mark.parametrize("cfg, kwargs, pattern", [
    (dict(noise=config_lib.NoiseConfig(lambda_c=1.5)), {}, r"noise\.lambda_c=1\.5"),
    (dict(noise=config_lib.NoiseConfig(lambda_c=-0.1)), {}, r"noise\.lambda_c=-0\.1"),
    (dict(loss=config_lib.LossConfig(lambda_m=-1.0)), {}, r"loss\.lambda_m=-1\.0"),
    (dict(loss=config_lib.LossConfig(lx_estimator="emd")), {}, r"lx_estimator='emd'"),
    (dict(method="dnr_x"), {}, r"method='dnr_x'"),
    (dict(compile="pjit"), {}, r"compile='pjit'"),
    (dict(eval_k=60), dict(list_size=50), r"eval_k=60 exceeds the list size n=50"),
    (dict(global_batch_size=100), dict(num_devices=8),
     r"global_batch_size=100 is not divisible by the 8 devices"),
    (dict(model=config_lib.ModelConfig(num_items=10, backbone="gru4rec")), {},
     r"backbone='gru4rec'"),
    (dict(model=config_lib.ModelConfig(num_items=10, score_usage="mul")), {},
     r"score_usage='mul'"),
    (dict(model=config_lib.ModelConfig(num_items=10, hidden=30, num_heads=4)), {},
     r"hidden=30 must be divisible"),
])
def test_bad_values_fail_with_their_name(cfg, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate(_cfg(**cfg), **kwargs)


def test_apply_method_unknown_name():
  with pytest.raises(ValueError, match="unknown method 'dnr'"):
    config_lib.apply_method(_cfg(), "dnr")


@pytest.mark.parametrize("method", sorted(config_lib.METHODS))
def test_every_method_is_a_valid_config(method):
  cfg = config_lib.apply_method(_cfg(), method)
  config_lib.validate(cfg)
  assert cfg.method == method


def test_methods_set_what_defines_them():
  base = _cfg()
  assert config_lib.apply_method(base, "backbone").model.score_usage == "none"
  assert not config_lib.uses_noise(config_lib.apply_method(base, "c_score"))
  g = config_lib.apply_method(base, "heuristic_b")
  assert g.noise.heuristic == "beta" and not config_lib.generator_active(g, epoch=10**6)
  d = config_lib.apply_method(dataclasses.replace(base, warmup_epochs=3), "dnr_g")
  assert not config_lib.generator_active(d, 2) and config_lib.generator_active(d, 3)
  assert config_lib.apply_method(base, "dnr_g_no_adv").loss.lambda_adv == 0
  assert config_lib.apply_method(base, "dnr_g_no_lx").loss.lambda_x == 0


def test_with_overrides_sets_dotted_fields_and_rejects_unknown():
  cfg = config_lib.with_overrides(_cfg(), {"loss.lambda_x": 0.5, "num_epochs": 3,
                                           "model.hidden": 64})
  assert (cfg.loss.lambda_x, cfg.num_epochs, cfg.model.hidden) == (0.5, 3, 64)
  with pytest.raises(ValueError, match="unknown config field 'loss.lambda_q'"):
    config_lib.with_overrides(_cfg(), {"loss.lambda_q": 1.0})
  with pytest.raises(ValueError, match="unknown config field 'optim.lr'"):
    config_lib.with_overrides(_cfg(), {"optim.lr": 1.0})


@pytest.mark.parametrize("key, text, value", [
    ("warmup_epochs", "4", 4), ("warmup_epochs", "4.0", 4), ("noise.lambda_c", "0.3", 0.3),
    ("noise.clip", "false", False), ("loss.lx_estimator", "mmd", "mmd"),
])
def test_parse_value_uses_the_field_type(key, text, value):
  got = config_lib.parse_value(_cfg(), key, text)
  assert got == value and type(got) is type(value)


@pytest.mark.parametrize("key, text, pattern", [
    ("warmup_epochs", "2.5", r"warmup_epochs='2.5' is not a valid int"),
    ("noise.clip", "maybe", r"noise.clip='maybe' is not a valid bool"),
    ("noise.lambda_z", "1", r"unknown config field 'noise.lambda_z'"),
])
def test_parse_value_names_bad_text(key, text, pattern):
  with pytest.raises(ValueError, match=pattern):
    config_lib.parse_value(_cfg(), key, text)


@pytest.mark.parametrize("method", ["dnr_g", "dnr_b", "dnr_g_no_adv", "dnr_g_no_lx"])
@pytest.mark.parametrize("warmup, epochs", [(12, 12), (80, 50)])
def test_a_model_generator_that_never_trains_is_rejected(method, warmup, epochs):
  # With warmup_epochs >= num_epochs only the heuristic warm-up runs: the row would
  # be labelled DNR but be its heuristic_* row.
  cfg = config_lib.apply_method(_cfg(warmup_epochs=warmup, num_epochs=epochs), method)
  with pytest.raises(ValueError) as e:
    config_lib.validate(cfg)
  message = str(e.value)
  assert f"warmup_epochs={warmup}" in message and f"num_epochs={epochs}" in message
  assert "\n" not in message


@pytest.mark.parametrize("method", ["backbone", "c_score", "heuristic_g", "heuristic_b"])
def test_a_warmup_as_long_as_the_run_is_fine_without_a_model_generator(method):
  config_lib.validate(config_lib.apply_method(_cfg(warmup_epochs=12, num_epochs=12),
                                              method))
  config_lib.validate(config_lib.apply_method(_cfg(warmup_epochs=11, num_epochs=12),
                                              "dnr_g"))
