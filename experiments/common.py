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
# Model.
flags.DEFINE_enum("backbone", _D.model.backbone, config_lib.BACKBONES, "Reranker backbone.")
flags.DEFINE_enum("score_usage", _D.model.score_usage, config_lib.SCORE_USAGES,
                  "How retriever scores enter the backbone (overrides the method's).")
flags.DEFINE_integer("hidden", _D.model.hidden, "Hidden size.")
flags.DEFINE_integer("num_heads", _D.model.num_heads, "Attention heads.")
flags.DEFINE_integer("num_layers", _D.model.num_layers, "List encoder layers.")
flags.DEFINE_float("dropout", _D.model.dropout, "Dropout rate.")
# Noise.
flags.DEFINE_enum("heuristic", _D.noise.heuristic, config_lib.HEURISTICS,
                  "Warm-up noise (overrides the method's).")
flags.DEFINE_float("lambda_c", _D.noise.lambda_c, "Eq. 4 noise weight lambda_c.")
flags.DEFINE_float("gaussian_mean", _D.noise.gaussian_mean, "Gaussian eps mean.")
flags.DEFINE_float("gaussian_std", _D.noise.gaussian_std, "Gaussian eps std.")
flags.DEFINE_float("beta_a", _D.noise.beta_a, "Beta eps alpha.")
flags.DEFINE_float("beta_b", _D.noise.beta_b, "Beta eps beta.")
flags.DEFINE_bool("clip", _D.noise.clip, "Clip generated scores to [0, 1].")
# Losses.
flags.DEFINE_float("lambda_m", _D.loss.lambda_m, "Weight of L_z.")
flags.DEFINE_float("lambda_adv", _D.loss.lambda_adv, "Weight of L_adv.")
flags.DEFINE_float("lambda_x", _D.loss.lambda_x, "Weight of L_x.")
flags.DEFINE_enum("lx_estimator", _D.loss.lx_estimator, config_lib.LX_ESTIMATORS,
                  "Estimator of L_x.")
flags.DEFINE_bool("lx_per_class", _D.loss.lx_per_class, "Match L_x per label class.")
# Schedule and optimisation.
flags.DEFINE_integer("warmup_epochs", _D.warmup_epochs,
                     "lambda_e: heuristic epochs before the model generator.")
flags.DEFINE_integer("num_epochs", _D.num_epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _D.global_batch_size, "Global batch size (lists).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Reranker learning rate.")
flags.DEFINE_float("generator_learning_rate", _D.generator_learning_rate,
                   "Generator learning rate.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "Reranker weight decay.")
flags.DEFINE_enum("compile", _D.compile, config_lib.COMPILERS,
                  "Compile the per-device step with jax.pmap or jit(shard_map).")
flags.DEFINE_integer("eval_k", _D.eval_k, "K of the @K metrics.")
flags.DEFINE_integer("log_every_steps", _D.log_every_steps, "Log every N steps (0: never).")

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

# flag name -> (config section or None for TrainConfig, field name)
_FIELDS = {
    "backbone": ("model", "backbone"), "score_usage": ("model", "score_usage"),
    "hidden": ("model", "hidden"), "num_heads": ("model", "num_heads"),
    "num_layers": ("model", "num_layers"), "dropout": ("model", "dropout"),
    "heuristic": ("noise", "heuristic"), "lambda_c": ("noise", "lambda_c"),
    "gaussian_mean": ("noise", "gaussian_mean"), "gaussian_std": ("noise", "gaussian_std"),
    "beta_a": ("noise", "beta_a"), "beta_b": ("noise", "beta_b"),
    "clip": ("noise", "clip"),
    "lambda_m": ("loss", "lambda_m"), "lambda_adv": ("loss", "lambda_adv"),
    "lambda_x": ("loss", "lambda_x"), "lx_estimator": ("loss", "lx_estimator"),
    "lx_per_class": ("loss", "lx_per_class"),
    "warmup_epochs": (None, "warmup_epochs"), "num_epochs": (None, "num_epochs"),
    "batch_size": (None, "global_batch_size"), "learning_rate": (None, "learning_rate"),
    "generator_learning_rate": (None, "generator_learning_rate"),
    "weight_decay": (None, "weight_decay"), "compile": (None, "compile"),
    "eval_k": (None, "eval_k"), "log_every_steps": (None, "log_every_steps"),
}


def overrides_from_flags() -> dict:
  """Dotted-key overrides (``config.with_overrides``) of the flags given explicitly."""
  out = {}
  for name, (section, field) in _FIELDS.items():
    if FLAGS[name].present:
      out[f"{section}.{field}" if section else field] = FLAGS[name].value
  return out


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
