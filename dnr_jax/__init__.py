"""dnr-jax: the Denoising Neural Reranker (DNR) for two-stage recommenders, in JAX.

One module per idea: ``batch`` (the list structure), ``config`` (typed configs and the
paper's methods), ``models`` (rerankers), ``noise`` (generators, Eq. 4), ``losses``
(Eq. 5), ``step`` (the multi-device train step), ``metrics``, ``train`` (the loop),
``experiment`` (tables and plots), ``synthetic`` (planted-preference lists).
"""

from dnr_jax.batch import ListBatch
from dnr_jax.config import (LossConfig, METHODS, ModelConfig, NoiseConfig, TrainConfig,
                            apply_method, validate, with_overrides)
from dnr_jax.models import make_reranker
from dnr_jax.noise import heuristic_scores, make_generator
from dnr_jax.step import DNRState, Runner, create_state, train_step
from dnr_jax.train import train_and_evaluate

__version__ = "0.1.0"

__all__ = [
    "DNRState", "ListBatch", "LossConfig", "METHODS", "ModelConfig", "NoiseConfig",
    "Runner", "TrainConfig", "apply_method", "create_state", "heuristic_scores",
    "make_generator", "make_reranker", "train_and_evaluate", "train_step", "validate",
    "with_overrides",
]
