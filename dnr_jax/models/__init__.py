"""Rerankers ``q_theta(z | x)``: PRM, SetRank, DLCM and PIER behind one interface.

``make_reranker(config)`` returns a Flax module used as::

  logits = module.apply({"params": theta}, batch, train=..., rngs={"dropout": key})

with ``logits`` ``[B, n]``. The retriever scores are read from ``batch.scores`` (the
train step swaps in generated scores with ``batch.replace(scores=x_prime)``), and
the model is differentiable in them: the generator is trained through it (L_adv).

``module.apply(..., score_sets=s)`` with ``s`` ``[K, B, n]`` scores the same lists
under ``K`` score vectors at once and returns ``[K, B, n]``: the user state (the
history encoder) and the item tokens are computed once and shared, and the list
encoder runs on the ``K * B`` lists in one pass. The train step scores the real and
the generated scores of a batch this way (``L_direct`` and ``L_z``).

``ModelConfig.compute_dtype="bfloat16"`` runs activations and matmuls in bfloat16
(parameters stay float32; the logits are returned in float32).

The package: ``layers`` (the shared parts: ``InputTokens``, encoder blocks, the
head), ``listwise`` (PRM, SetRank, DLCM), ``pier`` (PIER's OCPM and FPSM search),
``dropout`` (the hash-based dropout every backbone uses) and ``registry`` (backbones
by name; ``ranking_fn``, the hook of a backbone that ranks by more than its logits).
"""

from dnr_jax.models.layers import InputTokens, compute_dtype
from dnr_jax.models.listwise import DLCM, PRM, SetRank
from dnr_jax.models.pier import PIER
from dnr_jax.models.registry import BACKBONES, RankFn, make_reranker, ranking_fn

__all__ = ["BACKBONES", "DLCM", "InputTokens", "PIER", "PRM", "RankFn", "SetRank",
           "compute_dtype", "make_reranker", "ranking_fn"]
