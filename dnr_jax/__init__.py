"""dnr-jax: the Denoising Neural Reranker (DNR) for two-stage recommenders, in JAX.

One module per idea: ``batch`` (the list structure), ``config`` (typed configs and the
paper's methods), ``models`` (rerankers), ``noise`` (generators, Eq. 4), ``losses``
(Eq. 5), ``step`` (the multi-device train step), ``metrics``, ``train`` (the loop),
``experiment`` (tables and plots), ``synthetic`` (planted-preference lists),
``serving`` (the trained reranker bundle, batch scoring, ``jax.export``) and
``exported`` (loading an exported reranker with jax alone).
"""

import importlib

# Public names -> their module, imported on first use (PEP 562): importing one
# light module (``dnr_jax.exported``, ``dnr_jax.errors``) must not pull in Flax and
# the models, so that a serving process can load an exported reranker without them.
_EXPORTS = {
    "ListBatch": "batch",
    "LossConfig": "config", "METHODS": "config", "ModelConfig": "config",
    "NoiseConfig": "config", "TrainConfig": "config", "apply_method": "config",
    "validate": "config", "with_overrides": "config",
    "make_reranker": "models",
    "heuristic_scores": "noise", "make_generator": "noise",
    "DNRState": "step", "Runner": "step", "create_state": "step",
    "train_step": "step",
    "train_and_evaluate": "train",
}

__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"dnr_jax.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'dnr_jax' has no attribute {name!r}")
