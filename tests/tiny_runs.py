"""Tiny trained runs that several test files share (not a test file itself).

Imported as ``tiny_runs``: pytest puts ``tests/`` on ``sys.path`` for its test files.
"""

import dataclasses
import types

import numpy as np

from dnr_jax import config as config_lib
from dnr_jax import serving
from dnr_jax import train
from dnr_jax.data import own_lists
from dnr_jax.data import types as data_types
from dnr_jax.data.own_lists import sample as own_lists_sample
from dnr_jax.runtime import pipeline
from dnr_jax.runtime import runner as runner_lib


def read_arrays(path, config, vocab, history=None):
  """The ``batch.FIELDS`` arrays of every list of an own-lists file."""
  chunks = list(own_lists.read_lists(path, vocab=vocab, config=config,
                                     history=history))
  return {k: np.concatenate([c.arrays[k] for c in chunks]) for k in chunks[0].arrays}


def own_lists_run(root, n, h, devices, method="c_score", train_overrides=None,
                  **data_overrides):
  """A tiny one-epoch run on a generated own-lists example (120 lists, 6-14
  candidates, features, an interactions file), with its bundle under
  ``<root>/workdir/runs/prm/<method>/seed0/bundle``; ``data_overrides`` are
  ``OwnListsConfig`` fields (``min_id_count=...``), ``train_overrides``
  ``TrainConfig`` fields (``model_parallel=...``)."""
  lists, inter = own_lists_sample.write_example(
      str(root / "example"), own_lists_sample.ExampleConfig(
          num_users=30, num_items=60, lists_per_user=4, min_candidates=6,
          max_candidates=14))
  data_config = own_lists.OwnListsConfig(lists=lists, interactions=inter, list_size=n,
                                         history_size=h, chunk_rows=200,
                                         **data_overrides)
  vocab = own_lists.fit_vocabulary(data_config)
  vocab_dir = str(root / "vocab")
  vocab.save(vocab_dir)
  history = own_lists.InteractionHistory.load(inter, vocab, data_config)
  arrays = read_arrays(lists, data_config, vocab, history)
  cut = {"train": slice(0, 64), "valid": slice(64, 96), "test": slice(96, 120)}
  data = data_types.PreparedLists(
      splits={s: {k: v[c] for k, v in arrays.items()} for s, c in cut.items()},
      num_items=vocab.num_items, num_users=vocab.num_users,
      user_feature_vocab=vocab.user_feature_vocab,
      item_feature_vocab=vocab.item_feature_vocab, name="generated", is_real=False)
  cfg = config_lib.apply_method(config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=16, num_heads=2, dropout=0.1),
      num_epochs=1, global_batch_size=32, eval_batch_size=32, log_every_steps=0,
      eval_shuffled_scores=False), method)
  cfg = dataclasses.replace(cfg, **(train_overrides or {}))
  workdir = root / "workdir"
  run_dir = workdir / "runs" / "prm" / method / "seed0"
  result = train.train_and_evaluate(cfg, data, str(run_dir), devices=devices)
  bundle = serving.Bundle.from_result(
      result, list_size=n, history_size=h, vocabulary_dir=vocab_dir,
      data_config=dataclasses.asdict(data_config))
  serving.save_bundle(str(run_dir / "bundle"), bundle)
  return types.SimpleNamespace(
      root=root, lists=lists, inter=inter, workdir=str(workdir), arrays=arrays,
      result=result, bundle=serving.load_bundle(str(workdir)), config=data_config,
      vocab=vocab, run_dir=str(run_dir))


def eval_logits(run, devices, model_parallel=1):
  """The training loop's own eval logits (``Runner.evaluate``) of the run's selected
  parameters on every list of its file, ``[lists, n]``; with its tables split
  ``model_parallel`` ways if that is above 1."""
  cfg = dataclasses.replace(run.bundle.config, model_parallel=model_parallel)
  runner = runner_lib.Runner(cfg, devices)
  state = types.SimpleNamespace(reranker=types.SimpleNamespace(
      params=runner.put_state(run.result["best_params"])))
  arrays = pipeline.complete(run.arrays)
  return np.concatenate([
      np.asarray(runner.evaluate(state, b)[1])
      for b in pipeline.batches(arrays, cfg.eval_batch_size, shuffle=False)]
  )[:pipeline.num_lists(arrays)]
