"""Flags shared by the experiment binaries, and their translation into a TrainConfig.

Binaries stay thin: flags in, ``experiment_from_flags()``, one library call, results out.
A flag overrides the method preset only when it is given explicitly, so
``--methods=backbone --lambda_c=0.3`` keeps the preset's ``score_usage=none``.
"""

from __future__ import annotations


from absl import flags

from dnr_jax import config as config_lib

_D = config_lib.TrainConfig()

flags.DEFINE_list("methods", ["backbone", "c_score", "dnr_g"],
                  f"Rows of the paper's tables to train, from {sorted(config_lib.METHODS)}.")
flags.DEFINE_list("backbones", ["prm"], f"Backbones, from {list(config_lib.BACKBONES)}.")
flags.DEFINE_list("seeds", ["0"], "One run per seed; tables give mean +- std.")
flags.DEFINE_string("sweep", None,
                    "Figure 3 sensitivity sweep, FIELD=V1,V2,..., e.g. "
                    "noise.lambda_c=0.1,0.3,0.5 (run with --sweep_method).")
flags.DEFINE_enum("sweep_method", "dnr_g", sorted(config_lib.METHODS),
                  "The method the sweep trains.")
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and results go.")
# Flags that set one config field: (flag, dotted config key, help, choices or None).
# Defaults and types come from the config dataclasses, so the two cannot drift.
_CONFIG_FLAGS = (
    ("backbone", "model.backbone", "Reranker backbone.", config_lib.BACKBONES),
    ("score_usage", "model.score_usage",
     "How retriever scores enter the backbone (overrides the method's).",
     config_lib.SCORE_USAGES),
    ("hidden", "model.hidden", "Hidden size.", None),
    ("num_heads", "model.num_heads", "Attention heads.", None),
    ("num_layers", "model.num_layers", "List encoder layers.", None),
    ("dropout", "model.dropout", "Dropout rate.", None),
    ("heuristic", "noise.heuristic", "Warm-up noise (overrides the method's).",
     config_lib.HEURISTICS),
    ("lambda_c", "noise.lambda_c", "Eq. 4 noise weight lambda_c.", None),
    ("gaussian_mean", "noise.gaussian_mean", "Gaussian eps mean.", None),
    ("gaussian_std", "noise.gaussian_std", "Gaussian eps std.", None),
    ("beta_a", "noise.beta_a", "Beta eps alpha.", None),
    ("beta_b", "noise.beta_b", "Beta eps beta.", None),
    ("clip", "noise.clip", "Clip generated scores to [0, 1].", None),
    ("lambda_m", "loss.lambda_m", "Weight of L_z.", None),
    ("lambda_adv", "loss.lambda_adv", "Weight of L_adv.", None),
    ("lambda_x", "loss.lambda_x", "Weight of L_x.", None),
    ("lx_estimator", "loss.lx_estimator", "Estimator of L_x.", config_lib.LX_ESTIMATORS),
    ("lx_per_class", "loss.lx_per_class", "Match L_x per label class.", None),
    ("warmup_epochs", "warmup_epochs",
     "lambda_e: heuristic epochs before the model generator.", None),
    ("num_epochs", "num_epochs", "Training epochs.", None),
    ("batch_size", "global_batch_size", "Global batch size (lists).", None),
    ("learning_rate", "learning_rate", "Reranker learning rate.", None),
    ("generator_learning_rate", "generator_learning_rate", "Generator learning rate.",
     None),
    ("weight_decay", "weight_decay", "Reranker weight decay.", None),
    ("compile", "compile", "Compile the per-device step with jax.pmap or jit(shard_map).",
     config_lib.COMPILERS),
    ("eval_k", "eval_k", "K of the @K metrics.", None),
    ("log_every_steps", "log_every_steps", "Log every N steps (0: never).", None),
)


def _default(key: str):
  section, _, field = key.rpartition(".")
  return getattr(getattr(_D, section) if section else _D, field)


for _name, _key, _help, _choices in _CONFIG_FLAGS:
  _value = _default(_key)
  if _choices is not None:
    flags.DEFINE_enum(_name, _value, _choices, _help)
  elif isinstance(_value, bool):
    flags.DEFINE_bool(_name, _value, _help)
  elif isinstance(_value, int):
    flags.DEFINE_integer(_name, _value, _help)
  else:
    flags.DEFINE_float(_name, _value, _help)

FLAGS = flags.FLAGS


class _QuietLibraries:
  """Drops INFO records of orbax (dozens per checkpoint) from the absl log."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "/orbax/" not in record.pathname


def setup_logging() -> None:
  """Per-epoch progress lines stay readable: library chatter is filtered out."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  py_logging.getLogger("absl").addFilter(_QuietLibraries())


def overrides_from_flags() -> dict:
  """Dotted-key overrides (``config.with_overrides``) of the flags given explicitly."""
  return {key: FLAGS[name].value for name, key, _, _ in _CONFIG_FLAGS
          if FLAGS[name].present}


def experiment_from_flags(base: config_lib.TrainConfig | None = None):
  """The ``ExperimentConfig`` the flags describe; fails at once on bad values."""
  from dnr_jax import experiment  # pylint: disable=g-import-not-at-top
  try:
    seeds = tuple(int(s) for s in FLAGS.seeds)
  except ValueError as e:
    raise ValueError(f"--seeds={','.join(FLAGS.seeds)} must be integers") from e
  sweep_field, sweep_values = None, ()
  if FLAGS.sweep:
    sweep_field, _, values = FLAGS.sweep.partition("=")
    try:
      sweep_values = tuple(float(v) for v in values.split(","))
    except ValueError as e:
      raise ValueError(f"--sweep={FLAGS.sweep!r} must be FIELD=V1,V2,...") from e
  exp = experiment.ExperimentConfig(
      base=base or config_lib.TrainConfig(),
      overrides=tuple(overrides_from_flags().items()),
      methods=tuple(FLAGS.methods), backbones=tuple(FLAGS.backbones), seeds=seeds,
      sweep_field=sweep_field, sweep_values=sweep_values,
      sweep_method=FLAGS.sweep_method, plots=FLAGS.plots)
  experiment.validate(exp)
  return exp
