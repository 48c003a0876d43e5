"""dnr-jax: the Denoising Neural Reranker (DNR) for two-stage recommenders, in JAX.

The method sits at the top of the package, one module per idea: ``batch`` (the list
structure and its array schema), ``config`` (typed configs, the paper's methods),
``noise`` (generators, Eq. 4), ``losses`` (Eq. 5), ``metrics``, ``step``
(Algorithm 1 as one per-device step), ``train`` (the loop) and ``synthetic``
(planted-preference lists). Around it, one folder per role: ``models`` (the
backbones), ``runtime`` (compiling and placing the step, the input pipeline,
checkpoints, multi-host), ``protocol`` (the paper's experiments, tables, plots),
``serving`` (the trained bundle, scoring, files, export) and ``data`` (data sets and
your own lists).

The public names below are the ones a user calls; everything is also reachable by
its namespace (``dnr_jax.serving.load_bundle``). Names are imported on first use
(PEP 562), so importing a light module (``dnr_jax.serving.exported``,
``dnr_jax.errors``) does not pull in Flax and the models.

Example::

  from dnr_jax import config, synthetic, train
  cfg = config.apply_method(config.TrainConfig(num_epochs=4, warmup_epochs=2), "dnr_g")
  result = train.train_and_evaluate(cfg, synthetic.generate(), workdir="/tmp/run")
"""

import importlib

__version__ = "0.1.0"

# The namespaces: ``dnr_jax.<name>`` is a module or a package of its own.
_NAMESPACES = ("batch", "config", "data", "errors", "losses", "metrics", "models",
               "noise", "protocol", "runtime", "serving", "step", "synthetic", "train")

# Public name -> the module that defines it.
_EXPORTS = {
    # The list structure.
    "ListBatch": "batch",
    # Configs and the paper's methods.
    "LossConfig": "config", "METHODS": "config", "ModelConfig": "config",
    "NoiseConfig": "config", "TrainConfig": "config", "apply_method": "config",
    "validate": "config", "with_overrides": "config",
    # Errors a user can get (one line each).
    "CheckpointError": "errors", "ConfigError": "errors", "DNRError": "errors",
    "DataError": "errors", "Interrupted": "errors", "TrainingDiverged": "errors",
    # The method: models, generators, Algorithm 1's step, the loop.
    "make_reranker": "models",
    "heuristic_scores": "noise", "make_generator": "noise",
    "DNRState": "step", "create_state": "step", "train_step": "step",
    "Runner": "runtime.runner",
    "train_and_evaluate": "train",
    # The paper's experiments.
    "ExperimentConfig": "protocol.experiment", "run_experiment": "protocol.experiment",
    # Data.
    "PreparedLists": "data.types", "prepare_lists": "data.prepare",
    # Serving.
    "Bundle": "serving.bundle", "load_bundle": "serving.bundle",
    "score_lists": "serving.scorer", "rerank": "serving.scorer",
    "export_reranker": "serving.export", "load_exported": "serving.exported",
}

__all__ = sorted(_NAMESPACES + tuple(_EXPORTS))


def __getattr__(name):
  if name in _NAMESPACES:
    return importlib.import_module(f"dnr_jax.{name}")
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"dnr_jax.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'dnr_jax' has no attribute {name!r}")


def __dir__():
  return __all__
