"""Flags shared by the experiment binaries, and their translation into a TrainConfig.

Binaries stay thin: flags in, ``experiment_from_flags()``, one library call, results out.
Config flags apply to every run, except the fields a method's preset fixes (they
define the table's row): ``--methods=c_score,dnr_g --lambda_m=0.6`` gives DNR an L_z
weight of 0.6 and leaves c_score without L_z.

Every binary starts with ``common.run_main(main)`` instead of ``app.run(main)``: a user
error (any ``dnr_jax.errors.DNRError``: a bad flag or config, a data file, a
checkpoint, the work directory; or a flag the parser rejects) is then printed as ONE
line on stderr, ``ConfigError: --seeds=[0, 0] ...``, and the process exits with
``EXIT_CODES`` of its kind (2 flags and configs, 3 data, 4 checkpoints, 5 diverged
training, 75 interrupted by SIGTERM / SIGINT, 1 any other), without a traceback. ``DNR_TRACEBACK=1`` in the environment
or ``--verbosity=1`` shows the traceback instead. Anything else that escapes is a bug
and keeps its traceback. Check the work directory early with ``check_workdir``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
from typing import Callable

from absl import app, flags, logging

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax import host_allocator

_D = config_lib.TrainConfig()

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
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Multi-process runs (dnr_jax.distributed): auto connects with the "
                  "flags below when given, else where JAX detects a cluster (SLURM, "
                  "MPI, Cloud TPU pod) with several processes; on always connects; "
                  "off never does.")
flags.DEFINE_enum("host_allocator", "auto", ["auto", "reuse", "system"],
                  "CPU runs: keep the memory a step frees for the next step instead of "
                  "returning it to the OS (dnr_jax/host_allocator.py; 1.2-1.3x faster "
                  "steps on CPU). auto: on when JAX computes on the CPU; reuse: always; "
                  "system: never.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0's coordination service (multi-process).")
flags.DEFINE_integer("num_processes", None, "Processes in the multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
flags.DEFINE_list("local_device_ids", None,
                  "Local accelerators this process uses (e.g. one GPU per process: "
                  "its local rank); default all.")
flags.DEFINE_string("compilation_cache", "~/.cache/dnr_jax/xla",
                    "JAX's persistent compilation cache ('' turns it off): the seeds and "
                    "sweep points of an experiment compile the same programs, so all "
                    "runs after the first of each configuration skip compilation.")
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
    ("compute_dtype", "model.compute_dtype",
     "Activations' dtype; parameters and optimiser stay float32.",
     config_lib.COMPUTE_DTYPES),
    ("heuristic", "noise.heuristic", "Warm-up noise (overrides the method's).",
     config_lib.HEURISTICS),
    ("lambda_c", "noise.lambda_c", "Eq. 4 noise weight lambda_c.", None),
    ("gaussian_mean", "noise.gaussian_mean", "Gaussian eps mean.", None),
    ("gaussian_std", "noise.gaussian_std", "Gaussian eps std.", None),
    ("beta_a", "noise.beta_a", "Beta eps alpha.", None),
    ("beta_b", "noise.beta_b", "Beta eps beta.", None),
    ("clip", "noise.clip", "Clip generated scores to [0, 1].", None),
    ("sort_generated", "noise.sort_generated",
     "Present generated lists in the order of their generated scores.", None),
    ("generator_hidden", "noise.generator_hidden", "Model generator's MLP width.", None),
    ("generator_noise_dim", "noise.generator_noise_dim",
     "Size of the model generator's N(0, 1) draw.", None),
    ("lambda_m", "loss.lambda_m", "Weight of L_z.", None),
    ("lambda_adv", "loss.lambda_adv", "Weight of L_adv.", None),
    ("lambda_x", "loss.lambda_x", "Weight of L_x.", None),
    ("lx_estimator", "loss.lx_estimator", "Estimator of L_x.", config_lib.LX_ESTIMATORS),
    ("lx_per_class", "loss.lx_per_class", "Match L_x per label class.", None),
    ("adversarial_order", "adversarial_order",
     "The adversarial phase: sequential (Algorithm 1: phi against the updated theta) "
     "or simultaneous (phi's gradient from theta's own pass: fewer passes per step, "
     "another method; docs/dnr_investigation.md).", config_lib.ADVERSARIAL_ORDERS),
    ("warmup_epochs", "warmup_epochs",
     "lambda_e: heuristic epochs before the model generator.", None),
    ("num_epochs", "num_epochs", "Training epochs (with early stopping: the maximum).",
     None),
    ("early_stopping_patience", "early_stopping_patience",
     "Stop after this many epochs without a validation N@K gain of more than "
     "--early_stopping_min_delta, and report the best epoch (0: train --num_epochs).",
     None),
    ("early_stopping_min_delta", "early_stopping_min_delta",
     "The smallest validation N@K gain (a fraction, 0.0001 = 0.01 points) that counts "
     "as an improvement for early stopping.", None),
    ("batch_size", "global_batch_size", "Global batch size (lists).", None),
    ("learning_rate", "learning_rate", "Reranker learning rate.", None),
    ("generator_learning_rate", "generator_learning_rate", "Generator learning rate.",
     None),
    ("weight_decay", "weight_decay", "Reranker weight decay.", None),
    ("compile", "compile", "Compile the per-device step with jax.pmap or jit(shard_map).",
     config_lib.COMPILERS),
    ("eval_k", "eval_k", "K of the @K metrics.", None),
    ("log_every_steps", "log_every_steps", "Log every N steps (0: never).", None),
    ("nonfinite", "nonfinite",
     "A step with a NaN/inf loss or gradient is never applied; stop: the run fails "
     "(a FAILED row), skip: it goes on and counts the skipped steps.",
     config_lib.NONFINITE),
    ("resume", "resume",
     "A --workdir run that has checkpoints: check: resume only with the same config; "
     "force: resume with the new settings; never: set the old checkpoints aside and "
     "start fresh.", config_lib.RESUME_MODES),
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

# Data flags (the kuairand / movielens binaries): (flag, DataConfig key, help, choices).
_DATA_DEFAULT = None  # set lazily: importing dnr_jax.data pulls in TFDS
_DATA_FLAGS = (
    ("source_dir", "source_dir", "Where the raw files or official archive are.", None),
    ("data_dir", "data_dir", "Where prepared TFDS data sets go "
     "(default $DNR_DATA_DIR or ~/.cache/dnr_jax/datasets).", None),
    ("download", "download", "Download the official archive if source_dir lacks it.",
     None),
    ("label", "label", "KuaiRand's positive signal.", None),
    ("rating_threshold", "rating_threshold", "MovieLens: ratings >= this are positive.",
     None),
    ("include_random", "include_random", "KuaiRand: keep randomly exposed impressions.",
     None),
    ("k_core", "k_core", "Drop users and items with fewer rows (paper: 20).", None),
    ("protocol", "lists.protocol", "List protocol: exposure, retrieval or paper.", None),
    ("list_size", "lists.list_size", "n, candidates per list.", None),
    ("history_size", "lists.history_size", "H, history length.", None),
    ("window", "lists.window", "W, the next interactions that label a list.", None),
    ("retriever_fraction", "lists.retriever_fraction",
     "Earliest share of the timeline that trains the retriever.", None),
    ("retriever", "retriever.kind",
     "The retriever: mf (matrix factorisation, the paper's) or dual_tower (user tower "
     "over the history and user features, item tower over id and item features).",
     None),
    ("retriever_history", "retriever.tower_history",
     "Dual tower: previous positives the user tower reads.", None),
    ("retriever_dim", "retriever.dim",
     "Retriever embedding size (paper's MF: 128).", None),
    ("retriever_learning_rate", "retriever.learning_rate", "MF learning rate.", None),
    ("retriever_epochs", "retriever.epochs", "MF epochs.", None),
    ("retriever_negatives", "retriever.negatives", "Random negatives per positive.",
     None),
    ("sample_users", "sample.num_users", "Generated sample: users.", None),
    ("sample_items", "sample.num_items", "Generated sample: items.", None),
    ("sample_rows_per_user", "sample.rows_per_user", "Generated sample: rows per user.",
     None),
)


def define_data_flags(dataset: str, variants, default_variant: str) -> None:
  """Defines ``--variant`` and the data flags; defaults from ``DataConfig``."""
  from dnr_jax.data import prepare  # pylint: disable=g-import-not-at-top
  global _DATA_DEFAULT
  _DATA_DEFAULT = prepare.default_config(dataset, default_variant)
  flags.DEFINE_enum("variant", default_variant, list(variants),
                    f"Which {dataset} data set (sample: generated, NOT real data).")
  for name, key, help_, _ in _DATA_FLAGS:
    value = _lookup(_DATA_DEFAULT, key)
    if value is None:
      flags.DEFINE_string(name, None, help_)
    elif isinstance(value, bool):
      flags.DEFINE_bool(name, value, help_)
    elif isinstance(value, int):
      flags.DEFINE_integer(name, value, help_)
    elif isinstance(value, float):
      flags.DEFINE_float(name, value, help_)
    else:
      flags.DEFINE_string(name, value, help_)


def _lookup(obj, key: str):
  for part in key.split("."):
    obj = getattr(obj, part)
  return obj


def _replace(obj, key: str, value):
  head, _, rest = key.partition(".")
  if not rest:
    return dataclasses.replace(obj, **{head: value})
  return dataclasses.replace(obj, **{head: _replace(getattr(obj, head), rest, value)})


def data_config_from_flags():
  """The ``DataConfig`` the data flags describe; fails at once on bad values."""
  config = dataclasses.replace(_DATA_DEFAULT, variant=FLAGS.variant)
  for name, key, _, _ in _DATA_FLAGS:
    if FLAGS[name].present:
      config = _replace(config, key, FLAGS[name].value)
  config.validate()
  return config


FLAGS = flags.FLAGS


def check_workdir(path: str | None, *, create: bool = True,
                  flag: str = "--workdir") -> None:
  """Fails at once, naming ``flag``, when outputs cannot be written under ``path``.

  Runs before any data preparation or training, which can take hours. With
  ``create=False`` (``--check_flags``) nothing is created: the nearest existing
  folder must be a writable folder.
  """
  if path is None:
    return
  path = os.path.abspath(os.path.expanduser(path))
  try:
    if create:
      os.makedirs(path, exist_ok=True)
      with tempfile.TemporaryFile(dir=path):
        pass                     # the only test that works for root and on NFS too
      return
    existing = path
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise NotADirectoryError(f"{existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
      raise PermissionError(f"{existing} is not writable")
  except OSError as e:
    raise errors.ConfigError(f"{flag}={path}: cannot write there "
                             f"({e.strerror or e})") from e


# The exit status of each kind of user error (absl's flag errors: 2, as a usage error;
# dnr_jax.data.csv_reader.DataError: 3).
# An interrupted run (SIGTERM / SIGINT, checkpoint saved) exits with sysexits'
# EX_TEMPFAIL, 75: "try again", which is what a rerun (resuming) does.
EXIT_CODES = ((errors.ConfigError, 2), (errors.CheckpointError, 4),
              (errors.TrainingDiverged, 5), (errors.Interrupted, 75),
              (errors.DNRError, 1))


def exit_code(error: BaseException) -> int:
  """The exit status for a user error (``EXIT_CODES``)."""
  # Not imported here: dnr_jax.data pulls in TFDS, which the synthetic binary skips;
  # a DataError can only have been raised if its module was loaded.
  csv_reader = sys.modules.get("dnr_jax.data.csv_reader")
  if csv_reader is not None and isinstance(error, csv_reader.DataError):
    return 3
  return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), 1)


def show_traceback() -> bool:
  """``DNR_TRACEBACK=1`` or ``--verbosity`` >= 1: user errors keep their traceback."""
  env = os.environ.get("DNR_TRACEBACK", "").strip().lower()
  return env not in ("", "0", "false", "no") or (
      "verbosity" in FLAGS and FLAGS.is_parsed() and FLAGS.verbosity >= 1)


def one_line(error: BaseException) -> str:
  """``Kind: message`` on one line (a multi-line message is joined with "; ")."""
  text = "; ".join(part.strip() for part in str(error).splitlines() if part.strip())
  return f"{type(error).__name__}: {text}"


def _fail(error: BaseException, code: int) -> None:
  sys.stderr.flush()
  sys.stderr.write(one_line(error) + "\n")
  sys.stderr.flush()
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors as one line (absl prints two)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if show_traceback():
      raise
    _fail(e, 2)


def one_line_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """``main`` with its user errors printed as one line and a non-zero exit status.

  ``dnr_jax.errors.DNRError``, absl flag errors and ``app.UsageError`` are printed as
  ``Kind: message`` and exit with ``exit_code`` (2 for the absl ones);
  ``DNR_TRACEBACK=1`` or ``--verbosity=1`` re-raises them with their traceback.
  Every other exception passes through unchanged: it is a bug.
  """
  @functools.wraps(main)
  def guarded(argv):
    traceback = show_traceback()   # before main: setup() resets the verbosity
    try:
      return main(argv)
    except (errors.DNRError, flags.Error, app.UsageError) as e:
      if traceback:
        raise
      _fail(e, exit_code(e) if isinstance(e, errors.DNRError) else 2)
  return guarded


def with_host_allocator(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """``main`` run after ``--host_allocator`` is applied (flags must be parsed)."""
  @functools.wraps(main)
  def configured(argv):
    # Before JAX starts its CPU thread pools (host_allocator's docstring).
    allocator = host_allocator.configure(FLAGS.host_allocator)
    logging.info("host allocator: %s", allocator)
    return main(argv)
  return configured


def run_main(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` for every binary: flag errors and user errors in one line,
  the host allocator set before JAX starts."""
  app.run(one_line_errors(with_host_allocator(main)), flags_parser=parse_flags)


_CHATTY = ("/orbax/", "/tensorflow_datasets/")


class _QuietLibraries:
  """Drops INFO records of orbax (dozens per checkpoint) from the absl log."""

  def filter(self, record) -> bool:
    if "Using custom data configuration" in record.getMessage():
      return False   # TFDS, once per cached list set: the config is logged by us
    return record.levelno > 20 or not any(p in record.pathname for p in _CHATTY)


def distributed_config_from_flags():
  """The ``DistributedConfig`` the flags describe; fails at once on bad values."""
  from dnr_jax import distributed  # pylint: disable=g-import-not-at-top
  ids = FLAGS.local_device_ids
  try:
    ids = tuple(int(i) for i in ids) if ids is not None else None
  except ValueError as e:
    raise errors.ConfigError(
        f"--local_device_ids={','.join(ids)} must be integers") from e
  config = distributed.DistributedConfig(
      mode=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
      local_device_ids=ids)
  config.validate()
  return config


def setup() -> None:
  """Process set-up of every binary: logging, the compilation cache, and joining a
  multi-process run (``dnr_jax.distributed``) before any JAX computation.

  Per-epoch progress lines stay readable: library chatter is filtered out.
  """
  import os  # pylint: disable=g-import-not-at-top
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if FLAGS.compilation_cache and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()   # the builders log their own progress lines
  dist = distributed_config_from_flags()
  if not FLAGS.check_flags:   # --check_flags touches no device
    from dnr_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(dist)


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


def print_checked(exp, data_config=None) -> None:
  """``--check_flags``: what the flags resolved to, one line per method and sweep."""
  from dnr_jax import experiment  # pylint: disable=g-import-not-at-top
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


def main(argv) -> None:
  """The data binaries' body: flags -> DataConfig + experiment -> lists -> results."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from dnr_jax import distributed, experiment  # pylint: disable=g-import-not-at-top
  from dnr_jax.data import prepare  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup()
  # Every flag, and where the outputs go, is checked before any data work starts.
  exp = experiment_from_flags()
  data_config = data_config_from_flags()
  for method in exp.methods:
    config_lib.validate(experiment.run_config(exp, method, exp.backbones[0],
                                              exp.seeds[0], vocab=False),
                        list_size=data_config.lists.list_size, vocab=False)
  check_workdir(FLAGS.workdir, create=not FLAGS.check_flags)
  check_workdir(prepare.data_dir(data_config), create=not FLAGS.check_flags,
                flag="--data_dir")
  if FLAGS.check_flags:
    print_checked(exp, data_config)
    return
  logging.info("JAX %s on %d %s device(s)", jax.__version__, jax.local_device_count(),
               jax.default_backend())
  # Process 0 prepares (and caches) the lists first; the others then read its cache
  # or, on a file system of their own, repeat the same deterministic preparation.
  data = distributed.primary_first(lambda: prepare.prepare_lists(data_config),
                                   "prepare_lists")
  distributed.check_same(distributed.fingerprint(data.splits), "the prepared lists")
  out = experiment.run_experiment(exp, data, FLAGS.workdir)
  print(out["table"])
  print(f"outputs: {FLAGS.workdir}")
