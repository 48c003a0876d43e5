"""Flags shared by the experiment binaries, and their translation into a TrainConfig.

Binaries stay thin: flags in, ``config_from_flags()``, one library call, results out.
A flag overrides the method preset only when it is given explicitly, so
``--method=backbone --lambda_c=0.3`` keeps the preset's ``score_usage=none``.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from dnr_jax import config as config_lib

_D = config_lib.TrainConfig()

flags.DEFINE_enum("method", "dnr_g", sorted(config_lib.METHODS),
                  "Which row of the paper's tables to train.")
flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and results go.")
flags.DEFINE_integer("seed", _D.seed, "Random seed of the run.")
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
    "seed": (None, "seed"),
}


def config_from_flags(method: str | None = None,
                      base: config_lib.TrainConfig | None = None) -> config_lib.TrainConfig:
  """Defaults (or ``base``), then the method preset, then the flags given explicitly."""
  cfg = config_lib.apply_method(base or config_lib.TrainConfig(), method or FLAGS.method)
  sections = {"model": {}, "noise": {}, "loss": {}, None: {}}
  for name, (section, field) in _FIELDS.items():
    if FLAGS[name].present:
      sections[section][field] = FLAGS[name].value
  cfg = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, **sections["model"]),
      noise=dataclasses.replace(cfg.noise, **sections["noise"]),
      loss=dataclasses.replace(cfg.loss, **sections["loss"]), **sections[None])
  config_lib.validate(cfg)
  return cfg
