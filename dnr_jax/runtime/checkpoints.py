"""Checkpoints of a training run: orbax, config-checked, damage-tolerant.

A run's directory holds orbax checkpoints of the whole ``DNRState`` (both players,
optimiser states, key, step) plus a JSON ``meta`` item: the epoch position, the
per-epoch history and the run's config (``config.to_dict``). Each
checkpoint is named by the global train step it holds, so an epoch-end checkpoint
and a mid-epoch one (written when a run is stopped by a signal) order correctly.

Guarantees:

* **No non-finite checkpoint**: ``save`` refuses a state with a NaN or inf array
  (``errors.TrainingDiverged``); nothing is written.
* **Config-checked resume**: ``restore_latest`` compares the saved config with the
  new one (``RESUMABLE_FIELDS`` may differ) and, unless ``resume="force"``, stops
  with a one-line ``errors.CheckpointError`` listing ``field: old -> new`` and how
  to start fresh.
* **Damage recovery**: a checkpoint that fails to restore (truncated array file,
  truncated metadata, empty step folder) is reported in one log line, moved to
  ``<directory>.damaged/`` and the next older one is tried.
* **Stale temporary folders** of a save that was killed (orbax's
  ``*.orbax-checkpoint-tmp*``) are removed on start.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from dnr_jax import config as config_lib
from dnr_jax.runtime import distributed
from dnr_jax import errors

RESUME_MODES = config_lib.RESUME_MODES
# Fields that may change between a run and its resume without changing what the
# run computes: logging, checkpoint cadence, evaluation batching, the device
# program (pmap and shard_map run the same body on the same host state), the
# guards and the resume policy itself. ``num_epochs`` may grow (train on from the
# checkpoint; the model's schedule depends on ``warmup_epochs``, not on it); a
# resume below the checkpoint's epoch is refused in ``restore_latest``. The early-
# stopping settings decide when training stops, not what an epoch computes.
RESUMABLE_FIELDS = ("num_epochs", "early_stopping_patience", "early_stopping_min_delta",
                    "early_stopping_min_epochs",
                    "log_every_steps", "checkpoint_every_epochs",
                    "keep_checkpoints", "eval_batch_size", "compile", "nonfinite",
                    "resume")
_TMP_MARK = ".orbax-checkpoint-tmp"


def config_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """``(dotted field, old, new)`` for every field that differs and may not.

  A field that a checkpoint written by an older dnr-jax lacks counts as its default:
  that run trained with the behaviour the default names (a field is added with the
  old behaviour as its default), so adding a config field does not block resumes.
  """
  b = config_lib.flatten(new)
  defaults = config_lib.flatten(config_lib.to_dict(config_lib.TrainConfig()))
  a = {**{k: v for k, v in defaults.items() if k in b}, **config_lib.flatten(old)}
  return [(k, a.get(k, "<absent>"), b.get(k, "<absent>"))
          for k in sorted(set(a) | set(b))
          if k not in RESUMABLE_FIELDS and a.get(k, "<absent>") != b.get(k, "<absent>")]


def all_finite(tree) -> bool:
  """Whether every floating-point array of ``tree`` (host or device) is finite.

  A device array is read shard by shard, one copy of each (a sharded table is never
  gathered whole), and only the shards this process holds (``Checkpoints.save``
  combines the processes' answers).
  """
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array):
      x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.inexact):
      continue
    parts = ([s.data for s in x.addressable_shards if s.replica_id == 0]
             if isinstance(x, jax.Array) else [x])
    if not all(np.isfinite(np.asarray(p)).all() for p in parts):
      return False
  return True


def remove_stale_temporaries(directory: str) -> list[str]:
  """Deletes the temporary folders a killed save left in ``directory``; returns them."""
  if not os.path.isdir(directory):
    return []
  stale = [os.path.join(directory, n) for n in sorted(os.listdir(directory))
           if _TMP_MARK in n]
  for path in stale:
    shutil.rmtree(path, ignore_errors=True)
    logging.warning("removed the temporary checkpoint folder %s left by an interrupted "
                    "save", path)
  return stale


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class Checkpoints:
  """orbax ``CheckpointManager`` over the state plus JSON metadata.

  Args:
    directory: the checkpoint folder (created).
    keep: how many checkpoints to keep (``max_to_keep``).
    config: the run's config (saved with every checkpoint, checked on restore).
    resume: ``"check"`` (resume only with an equal config), ``"force"`` (resume,
      logging the differences) or ``"never"`` (checkpoints already there are moved
      aside to ``<directory>.old-<time>`` and the run starts fresh); default
      ``config.resume``.
  """

  def __init__(self, directory: str, keep: int, config=None,
               resume: Optional[str] = None):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    resume = resume or getattr(config, "resume", "check")
    if resume not in RESUME_MODES:
      raise errors.ConfigError(f"resume={resume!r} is not one of {list(RESUME_MODES)}")
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.config = config_lib.to_dict(config) if config is not None else None
    self.resume = resume
    if distributed.is_primary():   # one process tidies a shared folder
      remove_stale_temporaries(self.directory)
      if (resume == "never" and os.path.isdir(self.directory)
          and os.listdir(self.directory)):
        old = f"{self.directory}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(self.directory, old)
        logging.warning("resume=never: moved the existing checkpoints to %s; starting "
                        "fresh", old)
    distributed.barrier("checkpoints-tidied")
    self._open()

  def _open(self) -> None:
    ocp = self._ocp
    multi = jax.process_count() > 1
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True,
            # Across processes orbax syncs with device collectives
            # (sync_global_devices). From its background save thread they would
            # interleave with the training step's collectives in a different order
            # in each process, which deadlocks (seen under load with gloo): save on
            # the main thread, in program order, instead. One process keeps the
            # asynchronous save, whose syncs are no-ops there.
            enable_async_checkpointing=not multi,
            # Two managers (latest and best) may save the same step: their barrier
            # names must differ.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=os.path.basename(self.directory))))

  def latest(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """Saves ``state`` and ``meta`` (plus the config) as checkpoint ``step``.

    ``state`` is a host copy, or placed (sharded) device arrays, which each process
    writes its shards of (``Runner.checkpoint_state``).

    Raises:
      errors.TrainingDiverged: ``state`` holds a NaN or inf: nothing is written.
    """
    if distributed.any_process(not all_finite(state)):
      raise errors.TrainingDiverged(
          f"refusing to write checkpoint {step} in {self.directory}: the parameters "
          "are not finite")
    ocp = self._ocp
    meta = dict(meta, config=self.config)
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if not saved:
      raise errors.CheckpointError(
          f"{self.directory}: checkpoint {step} was not written (latest is "
          f"{self.latest()}); steps must increase")

  def restore(self, step: int, like):
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def _meta(self, step: int) -> dict:
    ocp = self._ocp
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def _check_config(self, step: int, meta: dict, num_epochs: Optional[int]) -> None:
    saved = meta.get("config")
    where = os.path.join(self.directory, str(step))
    if saved is None or self.config is None:
      logging.warning("checkpoint %s records no config: resuming unchecked", where)
      return
    diffs = config_differences(saved, self.config)
    if diffs:
      listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
      if self.resume != "force":
        raise errors.CheckpointError(
            f"{where} was written with a different config ({listed}); to start fresh "
            f"use another --workdir or delete {os.path.dirname(self.directory)}, or "
            "pass --resume=force to continue it with the new settings")
      logging.warning("resume=force: continuing %s with changed settings: %s", where,
                      listed)
    done = int(meta["epoch"]) + (0 if meta.get("step_in_epoch") else 1)
    if num_epochs is not None and num_epochs < done:
      raise errors.CheckpointError(
          f"{where} has trained {done} epochs, more than num_epochs={num_epochs}; "
          "raise --num_epochs to continue it, or start fresh in another --workdir")

  def restore_latest(self, like, num_epochs: Optional[int] = None
                     ) -> Optional[tuple[Any, dict]]:
    """The newest intact checkpoint as ``(state, meta)``, or None if there is none.

    A checkpoint that cannot be read is reported in one line and moved to
    ``<directory>.damaged/``; the next older one is tried.

    Raises:
      errors.CheckpointError: the config differs (``resume="check"``), or the forced
        resume's parameters do not fit the new model.
    """
    while self.latest() is not None:
      step = self.latest()
      try:
        meta = self._meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      self._check_config(step, meta, num_epochs)
      try:
        return self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except
        if self.resume == "force" and config_differences(meta.get("config") or {},
                                                         self.config or {}):
          raise errors.CheckpointError(
              f"{os.path.join(self.directory, str(step))}: resume=force cannot "
              f"restore the saved parameters into the new model ({_one_line(e)}); "
              "start fresh in another --workdir") from e
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, e: BaseException) -> None:
    path = os.path.join(self.directory, str(step))
    damaged = self.directory + ".damaged"
    os.makedirs(damaged, exist_ok=True)
    target = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    self.manager.close()
    if os.path.exists(path):
      shutil.move(path, target)
    logging.warning("checkpoint %s is damaged (%s): moved to %s; falling back to an "
                    "older one", path, _one_line(e), target)
    self._open()

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
