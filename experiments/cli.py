"""The command-line plumbing of every binary: one-line user errors, exit codes, process set-up.

Every binary starts with ``cli.run_main(main)`` instead of ``app.run(main)``: a user
error (any ``dnr_jax.errors.DNRError``: a bad flag or config, a data file, a
checkpoint, the work directory; or a flag the parser rejects) is then printed as ONE
line on stderr, ``ConfigError: --seeds=[0, 0] ...``, and the process exits with
``EXIT_CODES`` of its kind (2 flags and configs, 3 data, 4 checkpoints, 5 diverged
training, 75 interrupted by SIGTERM / SIGINT, 1 any other), without a traceback.
``DNR_TRACEBACK=1`` in the environment or ``--verbosity=1`` shows the traceback
instead. Anything else that escapes is a bug and keeps its traceback. Check the work
directory early with ``check_workdir``.

The flags defined here are the process's, not the experiment's: ``--host_allocator``
and ``--compilation_cache`` for every binary, and the multi-process flags
(``define_cluster_flags``) for the binaries that train.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable

from absl import app, flags, logging

from dnr_jax import errors
from dnr_jax.runtime import host_allocator

flags.DEFINE_enum("host_allocator", "auto", ["auto", "reuse", "system"],
                  "CPU runs: keep the memory a step frees for the next step instead of "
                  "returning it to the OS (dnr_jax/runtime/host_allocator.py; 1.2-1.3x "
                  "faster steps on CPU). auto: on when JAX computes on the CPU; reuse: "
                  "always; system: never.")
flags.DEFINE_string("compilation_cache", "~/.cache/dnr_jax/xla",
                    "JAX's persistent compilation cache ('' turns it off): the seeds and "
                    "sweep points of an experiment compile the same programs, so all "
                    "runs after the first of each configuration skip compilation.")
FLAGS = flags.FLAGS


# ---- one-line user errors ---------------------------------------------------------------

# The exit status of each kind of user error (absl's flag errors: 2, as a usage error).
# An interrupted run (SIGTERM / SIGINT, checkpoint saved) exits with sysexits'
# EX_TEMPFAIL, 75: "try again", which is what a rerun (resuming) does.
EXIT_CODES = ((errors.ConfigError, 2), (errors.DataError, 3), (errors.CheckpointError, 4),
              (errors.TrainingDiverged, 5), (errors.Interrupted, 75),
              (errors.DNRError, 1))


def exit_code(error: BaseException) -> int:
  """The exit status for a user error (``EXIT_CODES``)."""
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


# ---- process set-up ---------------------------------------------------------------------

_CHATTY = ("/orbax/", "/tensorflow_datasets/")


class _QuietLibraries:
  """Drops INFO chatter from the log: orbax (dozens per checkpoint), TFDS, JAX's TPU probe."""

  def filter(self, record) -> bool:
    message = record.getMessage()
    if "Using custom data configuration" in message:
      return False   # TFDS, once per cached list set: the config is logged by us
    if record.levelno <= 20 and "Unable to initialize backend 'tpu'" in message:
      return False   # JAX probes for a TPU on every machine; its absence is no error
    return record.levelno > 20 or not any(p in record.pathname for p in _CHATTY)


def setup(*, tfds: bool = False) -> None:
  """Process set-up of every binary, before any JAX computation: INFO logging with
  library chatter filtered out (per-epoch progress lines stay readable), and JAX's
  persistent compilation cache.

  ``tfds=True`` (the binaries that prepare TFDS data sets) also turns off TFDS's
  progress bars: the builders log their own progress lines. Without it TFDS is not
  imported: it costs seconds at start-up, for nothing in the synthetic and rerank
  binaries.
  """
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.compilation_cache and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
  if tfds:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top
    tensorflow_datasets.disable_progress_bar()


def define_cluster_flags() -> None:
  """Defines the multi-process flags (``--distributed``, ``--coordinator_address``, ...);
  called once, by the binaries that train (``join_cluster`` reads them)."""
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Multi-process runs (dnr_jax.runtime.distributed): auto connects "
                    "with the flags below when given, else where JAX detects a cluster "
                    "(SLURM, MPI, Cloud TPU pod) with several processes; on always "
                    "connects; off never does.")
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0's coordination service (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Processes in the multi-process run.")
  flags.DEFINE_integer("process_id", None,
                       "This process's index, 0 .. num_processes-1.")
  flags.DEFINE_list("local_device_ids", None,
                    "Local accelerators this process uses (e.g. one GPU per process: "
                    "its local rank); default all.")


def distributed_config_from_flags():
  """The ``DistributedConfig`` the cluster flags describe; fails at once on bad values."""
  from dnr_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
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


def join_cluster(*, check_only: bool = False) -> None:
  """Joins the multi-process run the cluster flags describe
  (``dnr_jax.runtime.distributed``), before any JAX computation; ``check_only``
  validates the flags and touches no device."""
  config = distributed_config_from_flags()
  if not check_only:
    from dnr_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(config)
