"""The training loop: ``train_and_evaluate(config, data, workdir)``.

Epochs follow Algorithm 1's schedule (``step.phase_for_epoch``). After every epoch
the reranker is evaluated on the validation and test lists with the *real* retriever
scores; the model is selected by validation NDCG@K and the test metrics reported are
those of the selected epoch. With ``early_stopping_patience`` the loop stops once the
validation metric stops improving (``dnr_jax.runtime.early_stopping``). With a ``workdir`` the
loop writes ``metrics.jsonl`` (one JSON object per epoch) and orbax checkpoints of the
whole state (both players, optimiser states, key, step), plus the selected epoch's
state in ``checkpoints_best/``, and resumes from the latest one when restarted.

Multi-process (``dnr_jax.runtime.distributed``): every process runs this loop on the same
lists and feeds its own share of each batch; evaluation sums over all processes, so
every process gets the same metrics; only process 0 writes ``metrics.jsonl``, while
every process takes part in orbax's checkpointing (which writes once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dnr_jax import batch as batch_lib
from dnr_jax.runtime import checkpoints as checkpoints_lib
from dnr_jax import config as config_lib
from dnr_jax.runtime import disk_input
from dnr_jax.runtime import distributed
from dnr_jax.runtime import early_stopping
from dnr_jax import errors
from dnr_jax.runtime import guards
from dnr_jax import metrics as metrics_lib
from dnr_jax import models
from dnr_jax.runtime import pipeline
from dnr_jax.runtime import preemption
from dnr_jax import step as step_lib
from dnr_jax.runtime import runner as runner_lib
from dnr_jax.data import list_records
from dnr_jax.data import types

SELECT_METRIC = "ndcg"


def with_data_vocab(config: config_lib.TrainConfig,
                      data: types.PreparedLists) -> config_lib.TrainConfig:
  """Fills the vocabulary sizes the data set dictates into the model config."""
  model = dataclasses.replace(config.model, num_items=data.num_items,
                              num_users=data.num_users,
                              user_feature_vocab=tuple(data.user_feature_vocab),
                              item_feature_vocab=tuple(data.item_feature_vocab))
  return dataclasses.replace(config, model=model)


def evaluate(runner: runner_lib.Runner, state: step_lib.DNRState, arrays,
             batch_size: int, *, num_items: int) -> dict[str, float]:
  """Metrics of the reranker on one split (all lists, padded last batch)."""
  c = runner.config
  rank = models.ranking_fn(c.model)
  if rank is not None:
    logits = ranked_logits(rank, runner.get_state(state.reranker.params), arrays,
                           batch_size)
    return _metrics(logits, arrays, k=c.eval_k, map_normaliser=c.map_normaliser,
                    num_items=num_items)
  sums, logits = None, []
  # Each process scores its share of every batch; the sums and the logits returned
  # by the runner cover the whole global batch.
  host_batches = pipeline.batches(arrays, batch_size, shuffle=False,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  for b in pipeline.prefetch(host_batches, size=2, transform=runner.put_batch):
    s, lg = runner.evaluate(state, b)
    sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    logits.append(lg)
  logits = jnp.concatenate(logits)[:pipeline.num_lists(arrays)]
  return _metrics(logits, arrays, k=c.eval_k, map_normaliser=c.map_normaliser,
                  num_items=num_items, sums=sums)


def ranked_logits(rank: models.RankFn, params, arrays, batch_size: int, *,
                  seed: int = 0) -> jax.Array:
  """A backbone's own ranking (``models.ranking_fn``) of every list of a split.

  Args:
    rank: the hook, ``(key, params, batch) -> logits``; compiled here.
    params: the reranker's parameters (host or device arrays).
    arrays: a complete split (``pipeline.complete``) of ``L`` lists.
    batch_size: lists per call (the last batch is padded; one compilation).
    seed: batch ``i`` uses ``fold_in(PRNGKey(seed), i)``, so every evaluation of a
      split ranks with the same randomness.

  Returns:
    ``[L, n]`` logits whose order is the ranking.
  """
  rank = jax.jit(rank)
  key = jax.random.PRNGKey(seed)
  out = [rank(jax.random.fold_in(key, i), params, batch_lib.ListBatch.from_arrays(b))
         for i, b in enumerate(pipeline.batches(arrays, batch_size, shuffle=False))]
  return jnp.concatenate(out)[:pipeline.num_lists(arrays)]


def _metrics(logits, arrays, *, k: int, map_normaliser: str, num_items: int,
             sums=None) -> dict[str, float]:
  acc = metrics_lib.Accumulator(k=k, map_normaliser=map_normaliser, num_items=num_items)
  acc.add(logits, arrays["labels"], arrays["mask"], arrays["items"], sums)
  return {**acc.results(), "logit_spread": guards.logit_spread(logits, arrays["mask"])}


def evaluate_retriever(arrays, *, k: int, map_normaliser: str,
                       num_items: int) -> dict[str, float]:
  """The retriever's own ranking as a row of the results (logits = its scores)."""
  return _metrics(arrays["scores"], arrays, k=k, map_normaliser=map_normaliser,
                  num_items=num_items)


def _fmt(metrics: dict[str, float], keys) -> str:
  return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def train_and_evaluate(config: config_lib.TrainConfig, data: types.PreparedLists,
                       workdir: Optional[str] = None, *,
                       devices: Optional[tuple] = None,
                       on_epoch: Optional[Callable[[dict], None]] = None,
                       on_resume: Optional[Callable[[list[dict]], None]] = None
                       ) -> dict[str, Any]:
  """Trains the reranker (and generator) of ``config`` on ``data``.

  Args:
    config: the run; ``model`` vocabulary sizes are taken from ``data``.
    data: prepared lists with ``train``, ``valid`` and ``test`` splits.
    workdir: where metrics and checkpoints go; ``None`` keeps nothing on disk.
    devices: the devices to run on (default: all, of every process).
    on_epoch: called with each epoch's record (for binaries that plot or report);
      in every process, with the same record.
    on_resume: called once before training with the epochs already done (the
      restored history; empty for a fresh run), e.g. to rewrite a TensorBoard log.

  Returns:
    ``{"config", "history", "best_epoch", "valid", "test", "retriever", "data",
    "stop_reason", "under_trained", "best_state", "final_state", "best_params"}``: per-epoch
    records, the selected epoch (by validation NDCG@K), its validation and test
    metrics, the retriever's own ranking on the test lists, why training ended,
    whether the selected epoch was the last of ``num_epochs`` (still improving), the
    selected epoch's state (host copy: the model to use) and the last epoch's, and
    ``best_params``, that state's reranker parameters (what ``serving`` bundles).
  """
  config = with_data_vocab(config, data)
  runner = runner_lib.Runner(config, devices or ())
  # A training split in a list-records file is read from disk (``runtime.disk_input``,
  # the same batches as in memory); valid and test are in memory.
  on_disk = isinstance(data.splits["train"], list_records.ListRecords)
  train = data.splits["train"] if on_disk else pipeline.complete(data.splits["train"])
  valid = pipeline.complete(data.splits["valid"])
  test = pipeline.complete(data.splits["test"])
  # One fixed shuffle (seed 0) for every run, so methods are compared on the same.
  test_shuffled = (pipeline.shuffle_scores(test) if config.eval_shuffled_scores
                   else None)
  n_train = len(train) if on_disk else pipeline.num_lists(train)
  n_dev = runner.num_devices
  if config.global_batch_size > n_train >= n_dev:
    # The paper's batch (2048) exceeds a small data set (the embedded sample): train
    # with the whole set per step rather than fail, and say so.
    smaller = n_train // n_dev * n_dev
    logging.warning("global_batch_size=%d exceeds the %d training lists; using %d",
                    config.global_batch_size, n_train, smaller)
    config = dataclasses.replace(config, global_batch_size=smaller)
  eval_bs = config.eval_batch_size or config.global_batch_size
  config_lib.validate(config, list_size=valid["items"].shape[1],
                      num_devices=runner.num_devices)
  if not data.is_real:
    logging.warning("DATA: %s -- this is NOT the real data; numbers are not comparable "
                    "to the paper.", data.name)
  else:
    logging.info("DATA: %s", data.name)
  logging.info("method=%s backbone=%s score_usage=%s devices=%d (%s, %d process(es)) "
               "compile=%s", config.method, config.model.backbone,
               config.model.score_usage, runner.num_devices, jax.default_backend(),
               jax.process_count(), config.compile)

  root = jax.random.PRNGKey(config.seed)
  per_device = config.global_batch_size // runner.num_devices
  example = batch_lib.ListBatch.from_arrays(
      train.read(range(min(per_device, n_train))) if on_disk
      else {k: v[:per_device] for k, v in train.items()})
  # With model_parallel > 1 created on the devices, the tables already split.
  state = runner.init_state(example, root)

  history: list[dict] = []
  start_epoch, start_step, done_steps = 0, 0, []
  ckpt = checkpoints_lib.Checkpoints(
      os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
      config) if workdir else None
  # The selected epoch's state: kept on the host while training, and on disk so that
  # a resumed run still reports the model of an epoch before the restart.
  best_ckpt = checkpoints_lib.Checkpoints(
      os.path.join(workdir, "checkpoints_best"), 1, config) if workdir else None
  best_state = None
  restored = (ckpt.restore_latest(runner.checkpoint_like(state),
                                  num_epochs=config.num_epochs)
              if ckpt is not None else None)
  if restored is not None:
    state, meta = restored
    history = list(meta["history"])
    start_epoch = int(meta["epoch"]) + 1
    if meta.get("step_in_epoch"):
      # A mid-epoch checkpoint (written on SIGTERM / SIGINT): continue that epoch at
      # its next batch, with the metrics of the steps it already took.
      start_epoch, start_step = int(meta["epoch"]), int(meta["step_in_epoch"])
      done_steps = [{k: np.float32(np.nan if v is None else v) for k, v in m.items()}
                    for m in meta["epoch_steps"]]
    logging.info("resumed from %s at epoch %d step %d", workdir, start_epoch + 1,
                 start_step)
  # One writer: every process holds the same record.
  metrics_path = (os.path.join(workdir, "metrics.jsonl")
                  if workdir and distributed.is_primary() else None)
  if metrics_path:
    os.makedirs(workdir, exist_ok=True)
    # Exactly the restored epochs: rows a killed run wrote after its last
    # checkpoint are dropped here and written again when recomputed.
    guards.write_jsonl(metrics_path, history)
  if on_resume:
    on_resume(history)

  state = runner.put_state(state)
  steps = n_train // config.global_batch_size
  if steps == 0:
    raise errors.ConfigError(f"global_batch_size={config.global_batch_size} exceeds "
                             f"the {n_train} training lists")

  def save(epoch: int, meta: dict) -> Optional[int]:
    if ckpt is None:
      return None
    step = int(runner.get_state(state.step))
    ckpt.save(step, runner.checkpoint_state(state), guards.json_safe(
        dict(meta, epoch=epoch, history=history)))
    return step

  def interrupted(signal_name: str, where: str, saved: Optional[int]):
    if ckpt is not None:
      ckpt.wait()
    msg = (f"training stopped by {signal_name} at {where}; " +
           (f"checkpoint {saved} saved in {ckpt.directory}: rerun the same command "
            "to resume" if saved is not None else "no workdir: nothing was saved"))
    logging.warning("%s", msg)
    return errors.Interrupted(msg)

  epoch_times: list[float] = []
  stop = preemption.StopRequests()
  # Early stopping's state is a function of the history, so a resumed run continues
  # (or stays stopped) exactly where it was.
  stopping = early_stopping.status(history, config, metric=SELECT_METRIC)
  with stop, (ckpt or contextlib.nullcontext()), (
      best_ckpt or contextlib.nullcontext()):
    for epoch in range(start_epoch, config.num_epochs):
      if stopping.stop:
        break
      phase = step_lib.phase_for_epoch(config, epoch)
      t0 = time.time()
      first = start_step if epoch == start_epoch else 0
      step_metrics = []
      # The last partial batch is dropped in training (shuffling brings its lists back
      # next epoch) so every train step has the same shape and nothing recompiles.
      # Batches are assembled and placed on the devices in a background thread while
      # the previous step runs, so the input pipeline stays off the critical path.
      where = dict(seed=config.seed, epoch=epoch, process_index=jax.process_index(),
                   process_count=jax.process_count())
      if on_disk:     # starts at ``first`` without reading the skipped lists
        host_batches = disk_input.batches(train, config.global_batch_size,
                                          start_step=first, **where)
      else:
        host_batches = itertools.islice(pipeline.batches(
            train, config.global_batch_size, shuffle=True, pad_last=False, **where),
                                        first, None)
      # Closed on every way out (an error, a stop request), so the reader threads of
      # the disk input stop with the epoch.
      batches = pipeline.prefetch(host_batches, size=2, transform=runner.put_batch)
      with contextlib.closing(batches):
        for i, b in enumerate(batches, start=first):
          state, m = runner.train(state, b, phase)
          step_metrics.append(m)
          if config.log_every_steps and (i + 1) % config.log_every_steps == 0:
            m = jax.device_get(m)
            if config.nonfinite == "stop" and m["nonfinite"]:
              raise guards.diverged(config, epoch, i, steps, m)
            logging.info("epoch %d step %d/%d %s", epoch + 1, i + 1, steps,
                         _fmt(m, ("l_theta", "l_phi")))
          # Processes stop at the same step, or the others would wait for it forever.
          if distributed.any_process(stop.requested is not None):
            so_far = done_steps + jax.device_get(step_metrics)
            saved = save(epoch, {"step_in_epoch": i + 1, "epoch_steps": so_far})
            raise interrupted(stop.requested or "another process's signal",
                              f"epoch {epoch + 1} step {i + 1}/{steps}", saved)
      step_metrics = (done_steps if first else []) + jax.device_get(step_metrics)
      train_metrics = guards.epoch_train_metrics(step_metrics)
      bad = guards.first_nonfinite(step_metrics)
      if bad is not None and (config.nonfinite == "stop"
                              or train_metrics["skipped_steps"] == len(step_metrics)):
        raise guards.diverged(config, epoch, bad, steps, step_metrics[bad],
                              "" if config.nonfinite == "stop"
                              else " (every step of the epoch was skipped)")
      if train_metrics["skipped_steps"]:
        logging.warning("epoch %d: %d of %d steps skipped (non-finite loss or "
                        "gradient), first at step %d", epoch + 1,
                        train_metrics["skipped_steps"], len(step_metrics), bad + 1)
      train_time = time.time() - t0
      valid_m = evaluate(runner, state, valid, eval_bs, num_items=data.num_items)
      test_m = evaluate(runner, state, test, eval_bs, num_items=data.num_items)
      if test_shuffled is not None:
        test_m["ndcg_shuffled_scores"] = evaluate(
            runner, state, test_shuffled, eval_bs, num_items=data.num_items)["ndcg"]
      record = {"epoch": epoch + 1, "phase": phase, "train": train_metrics,
                "valid": valid_m, "test": test_m,
                "lists_per_s": (steps - first) * config.global_batch_size / train_time,
                "epoch_s": time.time() - t0}
      warning = guards.collapse_warning(valid_m)
      if warning:
        record["warnings"] = [warning]
        logging.warning("epoch %d: %s", epoch + 1, warning)
      history.append(record)
      epoch_times.append(record["epoch_s"])
      # The first epoch of a run (and of each new phase) includes compilation: once
      # there are others, they predict the remaining epochs better.
      typical = np.mean(epoch_times[1:] if len(epoch_times) > 1 else epoch_times)
      eta = typical * (config.num_epochs - epoch - 1)
      logging.info("epoch %d/%d [%s] %.0f lists/s ETA %.0fs | %s | valid %s | test %s",
                   epoch + 1, config.num_epochs, phase, record["lists_per_s"], eta,
                   _fmt(train_metrics, ("l_direct", "l_z", "l_adv", "l_x")),
                   _fmt(valid_m, ("ndcg", "auc")), _fmt(test_m, ("ndcg", "auc")))
      if metrics_path:
        with open(metrics_path, "a") as f:
          f.write(guards.dumps(record) + "\n")
      if on_epoch:
        on_epoch(record)
      stopping = early_stopping.status(history, config, metric=SELECT_METRIC)
      if stopping.best_epoch == epoch + 1:
        step = int(runner.get_state(state.step))
        # Sharded tables are not gathered to the host at every better epoch: the
        # best checkpoint holds them, read back once at the end.
        sharded = config.model_parallel > 1 and best_ckpt is not None
        best_state = None if sharded else runner.get_state(state)
        # (A rerun of an epoch after a crash finds its own save there already.)
        if best_ckpt is not None and (best_ckpt.latest() is None
                                      or best_ckpt.latest() < step):
          best_ckpt.save(step, runner.checkpoint_state(state) if sharded
                         else best_state, {"epoch": epoch})
      saved = None
      signalled = distributed.any_process(stop.requested is not None)
      if ((epoch + 1) % config.checkpoint_every_epochs == 0
          or epoch + 1 == config.num_epochs or signalled or stopping.stop):
        saved = save(epoch, {})
      if signalled:
        raise interrupted(stop.requested or "another process's signal",
                          f"the end of epoch {epoch + 1}", saved)

    logging.info("training ended: %s", stopping.reason or
                 f"stopped after epoch {len(history)}; best epoch "
                 f"{stopping.best_epoch}")
    if stopping.under_trained:
      logging.warning("best epoch %d of %d is the last one: the model may be "
                      "under-trained (raise num_epochs, or set "
                      "early_stopping_patience)", stopping.best_epoch, len(history))
    best = history[stopping.best_epoch - 1]
    final_state = runner.get_state(state)
    # The devices' copy is no longer needed: a sharded best state is read back onto
    # the devices next, and two states there at once may not fit.
    del state
    if best["epoch"] == len(history):
      best_state = final_state
    elif best_state is None and best_ckpt is not None \
        and best_ckpt.latest() is not None:
      saved_best, meta = best_ckpt.restore(best_ckpt.latest(),
                                           runner.checkpoint_like(final_state))
      if int(meta["epoch"]) == best["epoch"] - 1:
        best_state = (saved_best if config.model_parallel == 1
                      else runner.get_state(saved_best))
    if best_state is None:
      # A work directory from before checkpoints_best existed: the best epoch's
      # parameters are gone.
      logging.warning("the state of the best epoch %d is not available (resumed "
                      "from an older checkpoint); best_state is the last epoch's",
                      best["epoch"])
      best_state = final_state
  retriever = evaluate_retriever(test, k=config.eval_k,
                                 map_normaliser=config.map_normaliser,
                                 num_items=data.num_items)
  result = {"config": dataclasses.asdict(config), "history": history,
            "best_epoch": best["epoch"], "valid": best["valid"], "test": best["test"],
            "retriever": retriever, "data": {"name": data.name, "is_real": data.is_real},
            "stop_reason": stopping.reason, "under_trained": stopping.under_trained,
            "best_state": best_state, "final_state": final_state,
            # What serving bundles: the selected epoch's reranker (host copy).
            "best_params": (best_state.reranker.params if best_state is not None
                            else None)}
  # hr is the paper's H@K (hits / max(K, #positives)); hit_any the binary hit.
  logging.info("best epoch %d by valid %s@%d: test %s | retriever %s", best["epoch"],
               SELECT_METRIC, config.eval_k,
               _fmt(best["test"], ("hr", "hit_any", "ndcg", "map", "f1", "auc")),
               _fmt(retriever, ("hr", "hit_any", "ndcg", "map", "f1", "auc")))
  return result
