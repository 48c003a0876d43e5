"""The flags of the binaries that train, and their translation into configs.

Binaries stay thin: flags in, ``experiment_from_flags()``, one library call, results out.
Config flags apply to every run, except the fields a method's preset fixes (they
define the table's row): ``--methods=c_score,dnr_g --lambda_m=0.6`` gives DNR an L_z
weight of 0.6 and leaves c_score without L_z.

Importing this module defines the experiment flags, one flag per ``TrainConfig`` field
of ``_CONFIG_FLAGS`` and the multi-process flags (``cli.define_cluster_flags``). The
data flags of the TFDS data sets (kuairand, movielens, amazon_books) wait for
``define_data_flags``: their defaults come from ``dnr_jax.data.prepare``, which
imports TFDS, and the synthetic binary must not pay for that.

(Not ``flags.py``: binaries import absl's ``flags`` too, and both would be ``flags``.)
"""

from __future__ import annotations

import dataclasses

from absl import flags

from dnr_jax import config as config_lib
from dnr_jax import errors
from experiments import cli

flags.DEFINE_list("methods", ["backbone", "c_score", "dnr_g"],
                  f"Rows of the paper's tables to train, from {sorted(config_lib.METHODS)}, "
                  "or variants of them: METHOD+FIELD=VALUE+..., e.g. "
                  "dnr_g+loss.lx_estimator=mmd+warmup_epochs=0 (settings apply after "
                  "the method's preset).")
flags.DEFINE_list("backbones", ["prm"], f"Backbones, from {list(config_lib.BACKBONES)}.")
flags.DEFINE_list("seeds", ["0"], "One run per seed; tables give mean +- std.")
flags.DEFINE_multi_string(
    "sweep", [], "Figure 3 sensitivity sweep, FIELD=V1,V2,..., e.g. "
    "noise.lambda_c=0.1,0.3,0.5; repeat the flag for more fields (one panel each: "
    "--sweep=noise.lambda_c=... --sweep=loss.lambda_m=... --sweep=warmup_epochs=...). "
    "Runs --sweep_method for every value and seed.")
flags.DEFINE_string("sweep_method", "dnr_g",
                    "The method (or variant, as in --methods) the sweep trains.")
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_bool("check_flags", False,
                  "Validate every flag and the configs they make, print them, and exit "
                  "without touching data or devices (e.g. before queueing a batch job).")
flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and results go.")
flags.DEFINE_enum("input", "memory", ["memory", "disk"],
                  "Training lists: memory (loaded whole) or disk (read batch by batch "
                  "with Grain from a one-list-per-record file written beside the "
                  "prepared lists: for a training split larger than host memory; the "
                  "same batches). Prepared data sets and own lists only.")
cli.define_cluster_flags()
FLAGS = flags.FLAGS

# ---- config fields as flags -------------------------------------------------------------

# Dotted TrainConfig key -> help. The flag is named after the field (``_RENAMED``
# lists the exceptions); its type and default come from the dataclass, and a field
# with a fixed set of values (``_CHOICES``) is an enum flag.
_CONFIG_FLAGS = {
    "model.backbone": "Reranker backbone.",
    "model.score_usage": "How retriever scores enter the backbone (overrides the method's).",
    "model.hidden": "Hidden size.",
    "model.num_heads": "Attention heads.",
    "model.num_layers": "List encoder layers.",
    "model.dropout": "Dropout rate.",
    "model.compute_dtype": "Activations' dtype; parameters and optimiser stay float32.",
    "noise.heuristic": "Warm-up noise (overrides the method's).",
    "noise.lambda_c": "Eq. 4 noise weight lambda_c.",
    "noise.gaussian_mean": "Gaussian eps mean.",
    "noise.gaussian_std": "Gaussian eps std.",
    "noise.beta_a": "Beta eps alpha.",
    "noise.beta_b": "Beta eps beta.",
    "noise.clip": "Clip generated scores to [0, 1].",
    "noise.sort_generated": "Present generated lists in the order of their generated "
                            "scores.",
    "noise.generator_hidden": "Model generator's MLP width.",
    "noise.generator_noise_dim": "Size of the model generator's N(0, 1) draw.",
    "loss.lambda_m": "Weight of L_z.",
    "loss.lambda_adv": "Weight of L_adv.",
    "loss.lambda_x": "Weight of L_x.",
    "loss.lx_estimator": "Estimator of L_x.",
    "loss.lx_per_class": "Match L_x per label class.",
    "adversarial_order":
        "The adversarial phase: sequential (Algorithm 1: phi against the updated theta) "
        "or simultaneous (phi's gradient from theta's own pass: fewer passes per step, "
        "another method; docs/dnr_investigation.md).",
    "warmup_epochs": "lambda_e: heuristic epochs before the model generator.",
    "num_epochs": "Training epochs (with early stopping: the maximum).",
    "early_stopping_patience":
        "Stop after this many epochs without a validation N@K gain of more than "
        "--early_stopping_min_delta, and report the best epoch (0: train --num_epochs).",
    "early_stopping_min_delta":
        "The smallest validation N@K gain (a fraction, 0.0001 = 0.01 points) that "
        "counts as an improvement for early stopping.",
    "early_stopping_min_epochs":
        "No early stop before this epoch, for every method (a DNR run also trains "
        "at least --warmup_epochs + --early_stopping_patience).",
    "global_batch_size": "Global batch size (lists).",
    "learning_rate": "Reranker learning rate.",
    "generator_learning_rate": "Generator learning rate.",
    "weight_decay": "Reranker weight decay.",
    "compile": "Compile the per-device step with jax.pmap or jit(shard_map).",
    "model_parallel":
        "Split the item and user embedding tables (and their Adam moments) by rows "
        "over this many devices (a 'model' mesh axis; must divide the device count); "
        "1: every device holds every table.",
    "eval_k": "K of the @K metrics.",
    "log_every_steps": "Log every N steps (0: never).",
    "nonfinite": "A step with a NaN/inf loss or gradient is never applied; stop: the run "
                 "fails (a FAILED row), skip: it goes on and counts the skipped steps.",
    "resume": "A --workdir run that has checkpoints: check: resume only with the same "
              "config; force: resume with the new settings; never: set the old "
              "checkpoints aside and start fresh.",
}
_RENAMED = {"global_batch_size": "batch_size"}
_CHOICES = {
    "model.backbone": config_lib.BACKBONES, "model.score_usage": config_lib.SCORE_USAGES,
    "model.compute_dtype": config_lib.COMPUTE_DTYPES,
    "noise.heuristic": config_lib.HEURISTICS, "loss.lx_estimator": config_lib.LX_ESTIMATORS,
    "adversarial_order": config_lib.ADVERSARIAL_ORDERS, "compile": config_lib.COMPILERS,
    "nonfinite": config_lib.NONFINITE, "resume": config_lib.RESUME_MODES,
}


def _flag_name(key: str) -> str:
  field = key.rpartition(".")[2]
  return _RENAMED.get(field, field)


def _lookup(obj, key: str):
  for part in key.split("."):
    obj = getattr(obj, part)
  return obj


def _define(name: str, value, help_: str, choices=None) -> None:
  """One flag of ``value``'s type with ``value`` as its default (None: a string)."""
  if choices is not None:
    flags.DEFINE_enum(name, value, list(choices), help_)
  elif isinstance(value, bool):
    flags.DEFINE_bool(name, value, help_)
  elif isinstance(value, int):
    flags.DEFINE_integer(name, value, help_)
  elif isinstance(value, float):
    flags.DEFINE_float(name, value, help_)
  else:
    flags.DEFINE_string(name, value, help_)


for _key, _help in _CONFIG_FLAGS.items():
  _define(_flag_name(_key), _lookup(config_lib.TrainConfig(), _key), _help,
          _CHOICES.get(_key))


def overrides_from_flags() -> dict:
  """Dotted-key overrides (``config.with_overrides``) of the flags given explicitly."""
  return {key: FLAGS[_flag_name(key)].value for key in _CONFIG_FLAGS
          if FLAGS[_flag_name(key)].present}


def experiment_from_flags(base: config_lib.TrainConfig | None = None):
  """The ``ExperimentConfig`` the flags describe; fails at once on bad values."""
  from dnr_jax.protocol import experiment  # pylint: disable=g-import-not-at-top
  try:
    seeds = tuple(int(s) for s in FLAGS.seeds)
  except ValueError as e:
    raise errors.ConfigError(f"--seeds={','.join(FLAGS.seeds)} must be integers") from e
  sweeps = []
  for spec in FLAGS.sweep:
    field, eq, values = spec.partition("=")
    if not eq or not field or not values:
      raise errors.ConfigError(f"--sweep={spec!r} must be FIELD=V1,V2,...")
    sweeps.append((field, tuple(v for v in values.split(",") if v)))
  exp = experiment.ExperimentConfig(
      base=base or config_lib.TrainConfig(),
      overrides=tuple(overrides_from_flags().items()),
      methods=tuple(FLAGS.methods), backbones=tuple(FLAGS.backbones), seeds=seeds,
      sweeps=tuple(sweeps),
      sweep_method=FLAGS.sweep_method, plots=FLAGS.plots)
  experiment.validate(exp)
  return exp


def check_runs(exp, list_size: int) -> None:
  """Every method's config against the data's list size (``eval_k <= n``), before
  any data work."""
  from dnr_jax.protocol import experiment  # pylint: disable=g-import-not-at-top
  for method in exp.methods:
    config_lib.validate(experiment.run_config(exp, method, exp.backbones[0],
                                              exp.seeds[0], vocab=False),
                        list_size=list_size, vocab=False)


def print_checked(exp, data_config=None) -> None:
  """``--check_flags``: what the flags resolved to, one line per method and sweep."""
  from dnr_jax.protocol import experiment  # pylint: disable=g-import-not-at-top
  if data_config is not None:
    print(f"data: {data_config}")
  for method in exp.methods:
    cfg = experiment.run_config(exp, method, exp.backbones[0], exp.seeds[0], vocab=False)
    print(f"method {method}: {cfg}")
  for field, values in exp.sweeps:
    print(f"sweep of {exp.sweep_method}: {field} = {', '.join(values)}")
  print(f"flags OK: {len(exp.methods)} method(s) and {len(exp.sweeps)} sweep(s) x "
        f"{len(exp.backbones)} backbone(s) x {len(exp.seeds)} seed(s); "
        f"workdir {FLAGS.workdir}")


def setup(*, tfds: bool = False) -> None:
  """The training binaries' process set-up: ``cli.setup``, then the multi-process run
  joined (under ``--check_flags`` only its flags are checked: no device is touched)."""
  cli.setup(tfds=tfds)
  cli.join_cluster(check_only=FLAGS.check_flags)


# ---- data flags of the TFDS data sets (kuairand, movielens, amazon_books) --------------

# Flag -> (dotted DataConfig key, help); types and defaults from the data set's
# ``prepare.default_config``.
_DATA_FLAGS = {
    "source_dir": ("source_dir", "Where the raw files or official archive are."),
    "data_dir": ("data_dir", "Where prepared TFDS data sets go (default $DNR_DATA_DIR "
                 "or ~/.cache/dnr_jax/datasets)."),
    "download": ("download", "Download the official archive if source_dir lacks it."),
    "label": ("label", "KuaiRand's positive signal."),
    "rating_threshold": ("rating_threshold",
                         "MovieLens, Amazon-Books: ratings >= this are positive."),
    "include_random": ("include_random", "KuaiRand: keep randomly exposed impressions."),
    "k_core": ("k_core", "Drop users and items with fewer rows (paper: 20)."),
    "protocol": ("lists.protocol", "List protocol: exposure, retrieval or paper."),
    "list_size": ("lists.list_size", "n, candidates per list."),
    "history_size": ("lists.history_size", "H, history length."),
    "window": ("lists.window", "W, the next interactions that label a list."),
    "retriever_fraction": ("lists.retriever_fraction",
                           "Earliest share of the timeline that trains the retriever."),
    "retriever": ("retriever.kind",
                  "The retriever: mf (matrix factorisation, the paper's) or dual_tower "
                  "(user tower over the history and user features, item tower over id "
                  "and item features)."),
    "retriever_history": ("retriever.tower_history",
                          "Dual tower: previous positives the user tower reads."),
    "retriever_dim": ("retriever.dim", "Retriever embedding size (paper's MF: 128)."),
    "retriever_learning_rate": ("retriever.learning_rate", "MF learning rate."),
    "retriever_epochs": ("retriever.epochs", "MF epochs."),
    "retriever_negatives": ("retriever.negatives", "Random negatives per positive."),
    "sample_users": ("sample.num_users", "Generated sample: users."),
    "sample_items": ("sample.num_items", "Generated sample: items."),
    "sample_rows_per_user": ("sample.rows_per_user", "Generated sample: rows per user."),
}
_data_default = None   # the DataConfig of define_data_flags' data set


def define_data_flags(dataset: str, variants, default_variant: str) -> None:
  """Defines ``--variant`` and the data flags; defaults from ``DataConfig``."""
  from dnr_jax.data import prepare  # pylint: disable=g-import-not-at-top
  global _data_default
  _data_default = prepare.default_config(dataset, default_variant)
  flags.DEFINE_enum("variant", default_variant, list(variants),
                    f"Which {dataset} data set (sample: generated, NOT real data).")
  for name, (key, help_) in _DATA_FLAGS.items():
    _define(name, _lookup(_data_default, key), help_)


def _replace(obj, key: str, value):
  head, _, rest = key.partition(".")
  if not rest:
    return dataclasses.replace(obj, **{head: value})
  return dataclasses.replace(obj, **{head: _replace(getattr(obj, head), rest, value)})


def data_config_from_flags():
  """The ``DataConfig`` the data flags describe; fails at once on bad values."""
  config = dataclasses.replace(_data_default, variant=FLAGS.variant)
  for name, (key, _) in _DATA_FLAGS.items():
    if FLAGS[name].present:
      config = _replace(config, key, FLAGS[name].value)
  config.validate()
  return config
