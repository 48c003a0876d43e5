"""The DNR train step before its CPU optimisations, frozen for comparison.

``python -m benchmarks.step --reference_step`` times this beside ``dnr_jax.step`` in
one run (interleaved), so the before/after figures of ``docs/performance.md`` can be
measured again on any machine. It is a verbatim copy of the PRM backbone (now
``dnr_jax/models/listwise.py``) and of the step's objectives and ``train_step``
(``dnr_jax/step.py``) at the commit before the optimisations: the reranker's forward
pass runs in full (history encoder included) for the real lists, again for the
generated lists, and again for the generator's objective. Same parameter tree as
today's PRM, so it runs on the same ``DNRState``. Not part of the library.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import losses
from dnr_jax import noise as noise_lib
from dnr_jax.step import AXIS, PHASES, DNRState, device_step_key


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer encoder block; padding masked out of attention."""
  hidden: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train)(
            h, h, mask=nn.make_attention_mask(mask, mask))
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.hidden)(nn.gelu(nn.Dense(2 * self.hidden)(h)))
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  w = mask[..., None].astype(x.dtype)
  return (x * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0)


class InputTokens(nn.Module):
  """Candidate tokens ``[B, n, d]`` from item, user and score inputs.

  * item: an item-id embedding plus one embedding per categorical item feature;
  * user: a Transformer over the history (item embeddings shared with the
    candidates, learned positions, padding masked), mean-pooled, plus user-id and
    user-feature embeddings; *added* to every candidate token, so attention over the
    list is personalised, as in PRM's personalised input;
  * scores (``score_usage``): ``concat`` joins a score embedding to the token and
    projects back to ``d``; ``add`` adds it; ``weight`` multiplies the item token by
    the scalar score, scaling the item's whole representation; ``none`` ignores the
    scores. The score embedding is an MLP on the scalar, not a bucket lookup, so the
    logits are differentiable in the scores.
  """
  config: config_lib.ModelConfig

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool) -> jax.Array:
    c = self.config
    d = c.hidden
    item_embed = nn.Embed(c.num_items, d, name="item_embed")
    item = item_embed(batch.items)
    for j, vocab in enumerate(c.item_feature_vocab):
      item = item + nn.Embed(vocab, d, name=f"item_feature_{j}")(
          batch.item_features[..., j])
    if c.score_usage == "weight":
      item = item * batch.scores[..., None]
    # User state from the history.
    hist = item_embed(batch.history)
    hist = hist + self.param("history_position", nn.initializers.normal(0.02),
                             (batch.history.shape[-1], d))
    for i in range(c.history_layers):
      hist = EncoderBlock(d, c.num_heads, c.dropout, name=f"history_{i}")(
          hist, batch.history_mask, train)
    user = _masked_mean(hist, batch.history_mask)
    user = user + nn.Embed(c.num_users, d, name="user_embed")(batch.user)
    for j, vocab in enumerate(c.user_feature_vocab):
      user = user + nn.Embed(vocab, d, name=f"user_feature_{j}")(
          batch.user_features[..., j])
    tokens = item + nn.Dense(d, name="user_proj")(user)[:, None, :]
    if c.score_usage in ("concat", "add"):
      s = nn.Dense(d, name="score_in")(batch.scores[..., None])
      s = nn.Dense(d, name="score_out")(nn.gelu(s))
      if c.score_usage == "add":
        tokens = tokens + s
      else:
        tokens = nn.Dense(d, name="score_concat")(jnp.concatenate([tokens, s], -1))
    return nn.Dropout(c.dropout, deterministic=not train)(tokens)


def _head(x: jax.Array, hidden: int) -> jax.Array:
  return nn.Dense(1, name="head_out")(nn.gelu(nn.Dense(hidden, name="head_in")(x)))[..., 0]


class PRM(nn.Module):
  """Personalized Re-ranking Model: a Transformer over the list with positions.

  Tokens (``InputTokens``) plus a learned embedding of the retriever rank (the
  position: candidates are stored in retriever order), then ``num_layers`` encoder
  blocks over the list, then a per-item MLP head.
  """
  config: config_lib.ModelConfig

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False) -> jax.Array:
    c = self.config
    x = InputTokens(c, name="tokens")(batch, train)
    x = x + self.param("rank_position", nn.initializers.normal(0.02),
                       (batch.items.shape[-1], c.hidden))
    for i in range(c.num_layers):
      x = EncoderBlock(c.hidden, c.num_heads, c.dropout, name=f"list_{i}")(
          x, batch.mask, train)
    return _head(nn.LayerNorm()(x), c.hidden)



def generated_scores(phi: Any, batch: batch_lib.ListBatch, key: jax.Array, *,
                     config: config_lib.TrainConfig, phase: str) -> Optional[jax.Array]:
  """``x'`` for this phase: Eq. 4 heuristic noise, the model generator, or None."""
  if phase == "heuristic":
    return noise_lib.heuristic_scores(key, batch.labels, batch.mask, config.noise)
  if phase == "model":
    generator = noise_lib.make_generator(config.noise, config.model)
    return generator.apply({"params": phi}, batch, rngs={"noise": key})
  return None


def reranker_objective(theta: Any, phi: Any, batch: batch_lib.ListBatch,
                       keys: tuple[jax.Array, jax.Array, jax.Array], *,
                       config: config_lib.TrainConfig, phase: str):
  """``L_theta = L_direct + lambda_m L_z`` (Eq. 5); the generator phi is frozen.

  ``phi`` enters only through ``x'``, which is a stop-gradient input here, so this
  objective's gradient with respect to phi is zero by construction.

  Args:
    keys: ``(dropout on real scores, dropout on generated scores, noise)``.

  Returns:
    ``(loss, terms)`` with ``terms`` holding ``l_direct``, ``l_z`` (when the phase
    generates scores) and ``l_theta``.
  """
  k_drop, k_drop_z, k_noise = keys
  reranker = _reranker(config.model)
  logits = reranker.apply({"params": theta}, batch, train=True, rngs={"dropout": k_drop})
  terms = {"l_direct": losses.direct_loss(logits, batch.labels, batch.mask)}
  total = terms["l_direct"]
  x_gen = generated_scores(phi, batch, k_noise, config=config, phase=phase)
  if x_gen is not None:
    x_gen = jax.lax.stop_gradient(x_gen)
    gen_batch = noise_lib.generated_list(batch, x_gen, config.noise.sort_generated)
    logits_z = reranker.apply({"params": theta}, gen_batch, train=True,
                              rngs={"dropout": k_drop_z})
    terms["l_z"] = losses.denoise_loss(logits_z, gen_batch.labels, gen_batch.mask)
    terms["mean_generated_score"] = jax.lax.stop_gradient(
        losses.masked_mean(x_gen, batch.mask))
    total = total + config.loss.lambda_m * terms["l_z"]
  terms["l_theta"] = total
  return total, terms


def generator_objective(phi: Any, theta: Any, batch: batch_lib.ListBatch,
                        key: jax.Array, *, config: config_lib.TrainConfig):
  """``L_phi = lambda_adv L_adv + lambda_x L_x`` (Eq. 5); the reranker theta is frozen.

  ``theta`` is a stop-gradient argument and the reranker runs without dropout: the
  generator attacks the model as it will be used. Its gradient with respect to theta
  is zero by construction.

  Returns:
    ``(loss, terms)`` with ``l_adv``, ``l_x`` and ``l_phi``.
  """
  theta = jax.lax.stop_gradient(theta)
  x = generated_scores(phi, batch, key, config=config, phase="model")
  gen_batch = noise_lib.generated_list(batch, x, config.noise.sort_generated)
  logits = _reranker(config.model).apply(
      {"params": theta}, gen_batch, train=False)
  l_adv = losses.adversarial_loss(logits, gen_batch.labels, gen_batch.mask)
  l_x = losses.distribution_loss(x, batch.scores, batch.labels, batch.mask, config.loss)
  total = config.loss.lambda_adv * l_adv + config.loss.lambda_x * l_x
  return total, {"l_adv": l_adv, "l_x": l_x, "l_phi": total}


def train_step(state: DNRState, batch: batch_lib.ListBatch, *,
               config: config_lib.TrainConfig, phase: str) -> tuple[DNRState, dict]:
  """One DNR iteration on this device's shard; call only under a ``'batch'`` axis.

  Order (Algorithm 1): theta is updated with ``reranker_objective`` (phi frozen), then
  phi with ``generator_objective`` against the reranker's **post-update** parameters
  (theta frozen), so the generator always attacks the current reranker.

  Randomness: ``fold_in(key, step)`` then ``fold_in(., axis_index('batch'))``, so every
  step and every device draws its own noise and dropout.

  Reductions: gradients and metrics are ``pmean``-ed over ``'batch'``; each loss is a
  masked mean over the shard's valid candidates.

  Args:
    state: both players; donated by the compiled wrappers (``Runner``).
    batch: this device's ``[B / devices, ...]`` share of the global batch.
    config: static; the run's configuration.
    phase: static; one of ``PHASES``.

  Returns:
    The new state and a dict of scalar metrics (loss terms, gradient norms, mean
    generated score), identical on every device.
  """
  if phase not in PHASES:
    raise ValueError(f"phase={phase!r} is not one of {PHASES}")
  batch_lib.check_batch(batch)
  key = device_step_key(state.key, state.step)
  k_drop, k_drop_z, k_noise, k_gen = jax.random.split(key, 4)
  reranker, generator = state.reranker, state.generator

  grads, metrics = jax.grad(reranker_objective, has_aux=True)(
      reranker.params, generator.params, batch, (k_drop, k_drop_z, k_noise),
      config=config, phase=phase)
  grads = jax.lax.pmean(grads, AXIS)
  reranker = reranker.apply_gradients(grads=grads)
  metrics["grad_norm_theta"] = optax.global_norm(grads)

  if phase == "model":
    g_grads, g_terms = jax.grad(generator_objective, has_aux=True)(
        generator.params, reranker.params, batch, k_gen, config=config)
    g_grads = jax.lax.pmean(g_grads, AXIS)
    generator = generator.apply_gradients(grads=g_grads)
    metrics.update(g_terms)
    metrics["grad_norm_phi"] = optax.global_norm(g_grads)

  metrics = jax.lax.pmean(metrics, AXIS)
  new_state = state.replace(step=state.step + 1, reranker=reranker, generator=generator)
  return new_state, metrics


def _reranker(config: config_lib.ModelConfig) -> nn.Module:
  if config.backbone != "prm" or config.compute_dtype != "float32":
    raise ValueError("the reference step has the float32 PRM backbone only")
  return PRM(config)
