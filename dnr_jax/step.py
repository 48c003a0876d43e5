"""Algorithm 1: the DNR train step and the eval step, as per-device bodies.

One per-device body, ``train_step``, does a whole DNR iteration on its shard of the
global batch: draw the noise, update the reranker theta with the generator frozen,
then update the generator phi with the reranker frozen. Gradients and metrics are
averaged over the ``'batch'`` axis with named collectives, so the same body compiles
under ``jax.pmap`` and under ``jax.jit(jax.shard_map(...))``; ``runtime.runner.Runner``
compiles and places it (``TrainConfig.compile``).

With ``TrainConfig.model_parallel = M > 1`` the body runs on a ``('batch', 'model')``
mesh: the batch is split over both axes (``data_axes``), the item and user tables
arrive as row shards (``models.tables``), and their gradients and norms are reduced
as shards (``mean_grads``, ``global_norm``). Every other value is what the
1-axis step computes on the same devices, up to the order of floating-point sums.

Phases (static: each compiles once):

* ``"direct"``: methods without generated scores (backbone, c/+/w score): L_direct only.
* ``"heuristic"``: Eq. 4 noise (Gaussian or Beta), theta only.
* ``"model"``: the model generator; theta, then phi.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
from flax.training import train_state

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import losses
from dnr_jax import metrics as metrics_lib
from dnr_jax import models
from dnr_jax import noise as noise_lib
from dnr_jax import parallel
from dnr_jax.parallel import data_axes, device_step_key, global_norm, mean_grads

AXIS = parallel.AXIS
PHASES = ("direct", "heuristic", "model")


@flax.struct.dataclass
class DNRState:
  """Both players and the randomness, one pytree (what is donated and checkpointed).

  Attributes:
    step: global step count (also folded into the key, so every step draws anew).
    reranker: theta, its optimiser state.
    generator: phi, its optimiser state (initialised for every method, so the
      checkpoint layout does not depend on the method).
    key: the root key of the step's randomness (raw ``uint32[2]``).
  """
  step: jax.Array
  reranker: train_state.TrainState
  generator: train_state.TrainState
  key: jax.Array


def phase_for_epoch(config: config_lib.TrainConfig, epoch: int) -> str:
  """Algorithm 1's schedule: which phase epoch ``epoch`` (0-based) trains in."""
  if not config_lib.uses_noise(config):
    return "direct"
  return "model" if config_lib.generator_active(config, epoch) else "heuristic"


def make_players(config: config_lib.TrainConfig):
  """The reranker and generator modules as the compiled step runs them (row-sharded
  tables when ``model_parallel > 1``)."""
  shards = config.model_parallel
  return (models.make_reranker(config.model, table_shards=shards),
          noise_lib.make_generator(config.noise, config.model, table_shards=shards))


def create_state(config: config_lib.TrainConfig, example: batch_lib.ListBatch,
                 key: jax.Array) -> DNRState:
  """Initialises both players from an example (per-device or global) batch.

  The tables are created whole (the same values for every ``model_parallel``);
  ``Runner.put_state`` splits them.

  Compiled as one program: run eagerly, the initialisers and optimiser states are
  hundreds of small operations, each compiled on its own (about 7 s per run on
  2 CPU cores, paid again after every ``jax.clear_caches()`` between runs).
  """
  return jax.jit(functools.partial(_create_state, config))(example, key)


def _create_state(config: config_lib.TrainConfig, example: batch_lib.ListBatch,
                  key: jax.Array) -> DNRState:
  k_rer, k_gen, k_drop, k_noise, k_root = jax.random.split(key, 5)
  reranker = models.make_reranker(config.model)
  generator = noise_lib.make_generator(config.noise, config.model)
  theta = reranker.init({"params": k_rer, "dropout": k_drop}, example, train=False)
  phi = generator.init({"params": k_gen, "noise": k_noise}, example)
  return DNRState(
      step=jnp.zeros((), jnp.int32),
      reranker=train_state.TrainState.create(
          apply_fn=reranker.apply, params=theta["params"],
          tx=parallel.optimizer(config.learning_rate, config.weight_decay,
                                config.grad_clip, config.model_parallel)),
      generator=train_state.TrainState.create(
          apply_fn=generator.apply, params=phi["params"],
          tx=parallel.optimizer(config.generator_learning_rate, 0.0,
                                config.grad_clip, config.model_parallel)),
      key=k_root)


def generated_scores(phi: Any, batch: batch_lib.ListBatch, key: jax.Array, *,
                     config: config_lib.TrainConfig, phase: str) -> Optional[jax.Array]:
  """``x'`` for this phase: Eq. 4 heuristic noise, the model generator, or None."""
  if phase == "heuristic":
    return noise_lib.heuristic_scores(key, batch.labels, batch.mask, config.noise)
  if phase == "model":
    _, generator = make_players(config)
    return generator.apply({"params": phi}, batch, rngs={"noise": key})
  return None


def reranker_objective(theta: Any, phi: Any, batch: batch_lib.ListBatch,
                       keys: tuple[jax.Array, jax.Array, jax.Array], *,
                       config: config_lib.TrainConfig, phase: str):
  """``L_theta = L_direct + lambda_m L_z`` (Eq. 5); the generator phi is frozen.

  ``phi`` enters only through ``x'``, which is a stop-gradient input here, so this
  objective's gradient with respect to phi is zero by construction.

  The real and the generated scores of a list are scored in ONE reranker pass
  (``score_sets``): the lists, hence the user's history, are the same, so the history
  encoder runs once for both terms, and the list encoder runs on the ``2B`` lists
  together. The loss and its expected gradient are those of two separate passes;
  with dropout, the history encoder's dropout mask is shared by the two terms (one
  pass) where two passes would draw one each, and the other dropout masks are drawn
  for the ``2B`` lists from one key. Without dropout the two formulations agree
  (``tests/step_test.py``; ``benchmarks/reference_step.py`` keeps the two-pass
  step). With ``noise.sort_generated`` the generated lists are re-ordered, so they
  are scored in a second pass.

  Args:
    keys: ``(dropout on real scores, dropout on generated scores, noise)``; the
      second key is used only by the two-pass (``sort_generated``) path.

  Returns:
    ``(loss, terms)`` with ``terms`` holding ``l_direct``, ``l_z`` (when the phase
    generates scores) and ``l_theta``.
  """
  k_drop, k_drop_z, k_noise = keys
  x_gen = generated_scores(phi, batch, k_noise, config=config, phase=phase)
  if x_gen is not None:
    x_gen = jax.lax.stop_gradient(x_gen)
  return reranker_loss(theta, batch, x_gen, (k_drop, k_drop_z), config=config)


def reranker_loss(theta: Any, batch: batch_lib.ListBatch, x_gen: Optional[jax.Array],
                   keys: tuple[jax.Array, jax.Array], *, config: config_lib.TrainConfig):
  """Eq. 5's ``L_theta`` given the generated scores ``x'`` (None: ``L_direct`` only)."""
  k_drop, k_drop_z = keys
  reranker, _ = make_players(config)
  if x_gen is None:
    logits = reranker.apply({"params": theta}, batch, train=True,
                            rngs={"dropout": k_drop})
    terms = {"l_direct": losses.direct_loss(logits, batch.labels, batch.mask)}
    terms["l_theta"] = terms["l_direct"]
    return terms["l_theta"], terms
  if config.noise.sort_generated:
    logits = reranker.apply({"params": theta}, batch, train=True,
                            rngs={"dropout": k_drop})
    gen_batch = noise_lib.generated_list(batch, x_gen, sort=True)
    logits_z = reranker.apply({"params": theta}, gen_batch, train=True,
                              rngs={"dropout": k_drop_z})
  else:
    gen_batch = noise_lib.generated_list(batch, x_gen, sort=False)
    logits, logits_z = reranker.apply(
        {"params": theta}, batch, train=True, rngs={"dropout": k_drop},
        score_sets=jnp.stack([batch.scores, x_gen]))
  terms = {"l_direct": losses.direct_loss(logits, batch.labels, batch.mask),
           "l_z": losses.denoise_loss(logits_z, gen_batch.labels, gen_batch.mask),
           "mean_generated_score": jax.lax.stop_gradient(
               losses.masked_mean(x_gen, batch.mask))}
  terms["l_theta"] = terms["l_direct"] + config.loss.lambda_m * terms["l_z"]
  return terms["l_theta"], terms


def simultaneous_grads(theta: Any, phi: Any, batch: batch_lib.ListBatch,
                       keys: tuple[jax.Array, jax.Array, jax.Array], *,
                       config: config_lib.TrainConfig):
  """Both players' gradients from one reranker pass (``adversarial_order="simultaneous"``).

  theta's gradient and loss terms are ``reranker_objective``'s for the same keys (the
  same ``x'``, the same dropout masks). phi's is the gradient of Eq. 5's
  ``L_phi = lambda_adv L_adv + lambda_x L_x`` with ``L_adv`` taken on that same pass:
  against the **pre-update** theta with dropout on, where Algorithm 1 (the default,
  ``generator_objective``) attacks the updated theta without dropout.

  Why one backward pass serves both players: ``L_adv = -L_z`` (Eq. 5) and ``x'``
  enters ``L_theta`` only through ``lambda_m L_z``, so the gradient that theta's
  backward pass delivers to ``x'`` is ``lambda_m dL_z/dx'`` and
  ``dL_adv/dx' = -(that) / lambda_m`` (``lambda_m > 0`` in every generator method:
  ``config.validate``). The generator runs once, its forward pass kept by ``jax.vjp``
  for phi's backward pass. Per step this drops the second reranker forward pass and
  its input backward pass: docs/dnr_investigation.md has the measured cost.

  Returns:
    ``(theta_grads, phi_grads, terms)``; ``terms`` as ``reranker_objective``'s plus
    ``l_adv``, ``l_x`` and ``l_phi``.
  """
  k_drop, k_drop_z, k_noise = keys
  lc = config.loss
  _, generator = make_players(config)
  x_gen, generator_vjp = jax.vjp(
      lambda p: generator.apply({"params": p}, batch, rngs={"noise": k_noise}), phi)
  (_, terms), (theta_grads, dl_theta_dx) = jax.value_and_grad(
      reranker_loss, argnums=(0, 2), has_aux=True)(
          theta, batch, x_gen, (k_drop, k_drop_z), config=config)
  l_x, dl_x_dx = jax.value_and_grad(losses.distribution_loss)(
      x_gen, batch.scores, batch.labels, batch.mask, lc)
  dl_adv_dx = -dl_theta_dx / lc.lambda_m
  (phi_grads,) = generator_vjp(lc.lambda_adv * dl_adv_dx + lc.lambda_x * dl_x_dx)
  terms["l_adv"] = -terms["l_z"]
  terms["l_x"] = l_x
  terms["l_phi"] = lc.lambda_adv * terms["l_adv"] + lc.lambda_x * l_x
  return theta_grads, phi_grads, terms


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
  logits = make_players(config)[0].apply({"params": theta}, gen_batch, train=False)
  l_adv = losses.adversarial_loss(logits, gen_batch.labels, gen_batch.mask)
  l_x = losses.distribution_loss(x, batch.scores, batch.labels, batch.mask, config.loss)
  total = config.loss.lambda_adv * l_adv + config.loss.lambda_x * l_x
  return total, {"l_adv": l_adv, "l_x": l_x, "l_phi": total}


def sequential_update(reranker, generator, batch: batch_lib.ListBatch, keys, *,
                      config: config_lib.TrainConfig, phase: str):
  """Algorithm 1's order: theta first (phi frozen), then phi against the new theta.

  Args:
    reranker, generator: the players' ``TrainState``s.
    keys: ``(dropout, dropout on generated scores, noise, generator's noise)``.

  Returns:
    ``(reranker, generator, metrics)``, gradients ``pmean``-ed over ``'batch'``.
  """
  k_drop, k_drop_z, k_noise, k_gen = keys
  grads, metrics = jax.grad(reranker_objective, has_aux=True)(
      reranker.params, generator.params, batch, (k_drop, k_drop_z, k_noise),
      config=config, phase=phase)
  grads = mean_grads(grads, config)
  reranker = reranker.apply_gradients(grads=grads)
  metrics["grad_norm_theta"] = global_norm(grads, config.model_parallel)
  if phase == "model":
    g_grads, g_terms = jax.grad(generator_objective, has_aux=True)(
        generator.params, reranker.params, batch, k_gen, config=config)
    g_grads = mean_grads(g_grads, config)
    generator = generator.apply_gradients(grads=g_grads)
    metrics.update(g_terms)
    metrics["grad_norm_phi"] = global_norm(g_grads, config.model_parallel)
  return reranker, generator, metrics


def simultaneous_update(reranker, generator, batch: batch_lib.ListBatch, keys, *,
                        config: config_lib.TrainConfig, phase: str):
  """Both players from one pass (``simultaneous_grads``) in the ``model`` phase.

  The other phases train theta alone, exactly as ``sequential_update`` does.
  """
  if phase != "model":
    return sequential_update(reranker, generator, batch, keys, config=config,
                             phase=phase)
  grads, g_grads, metrics = simultaneous_grads(
      reranker.params, generator.params, batch, keys[:3], config=config)
  g_grads = mean_grads(g_grads, config)
  generator = generator.apply_gradients(grads=g_grads)
  metrics["grad_norm_phi"] = global_norm(g_grads, config.model_parallel)
  grads = mean_grads(grads, config)
  reranker = reranker.apply_gradients(grads=grads)
  metrics["grad_norm_theta"] = global_norm(grads, config.model_parallel)
  return reranker, generator, metrics


# ``TrainConfig.adversarial_order`` -> the update it names.
_UPDATES = {"sequential": sequential_update, "simultaneous": simultaneous_update}


def train_step(state: DNRState, batch: batch_lib.ListBatch, *,
               config: config_lib.TrainConfig, phase: str) -> tuple[DNRState, dict]:
  """One DNR iteration on this device's shard; call only under a ``'batch'`` axis.

  Order (Algorithm 1, ``adversarial_order="sequential"``, the default): theta is
  updated with ``reranker_objective`` (phi frozen), then phi with
  ``generator_objective`` against the reranker's **post-update** parameters (theta
  frozen), so the generator always attacks the current reranker. With
  ``"simultaneous"`` both gradients come from one pass (``simultaneous_grads``).

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
    generated score, ``nonfinite``: 1.0 if the step was not applied because a loss
    or gradient norm was NaN/inf), identical on every device.
  """
  if phase not in PHASES:
    raise ValueError(f"phase={phase!r} is not one of {PHASES}")
  batch_lib.check_batch(batch)
  key = device_step_key(state.key, state.step, data_axes(config))
  k_drop, k_drop_z, k_noise, k_gen = jax.random.split(key, 4)
  update = _UPDATES[config.adversarial_order]
  reranker, generator, metrics = update(
      state.reranker, state.generator, batch, (k_drop, k_drop_z, k_noise, k_gen),
      config=config, phase=phase)
  metrics = jax.lax.pmean(metrics, data_axes(config))
  reranker, generator, metrics["nonfinite"] = _guard_nonfinite(
      state, reranker, generator, metrics)
  # The step counter advances even for a skipped step, so the next one draws anew.
  new_state = state.replace(step=state.step + 1, reranker=reranker, generator=generator)
  return new_state, metrics


def _guard_nonfinite(state: DNRState, reranker, generator, metrics: dict):
  """Keeps the old players if this step's losses or gradient norms are not finite.

  The checked scalars are already averaged over ``'batch'``, so every device takes
  the same branch. A few scalar reductions and one select per parameter: no host
  sync (the flag travels with the metrics the loop already fetches).

  Returns:
    ``(reranker, generator, nonfinite)``, ``nonfinite`` 1.0 for a skipped step.
  """
  names = [k for k in ("l_theta", "grad_norm_theta", "l_phi", "grad_norm_phi")
           if k in metrics]
  ok = jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in names]))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  return (keep(reranker, state.reranker), keep(generator, state.generator),
          1.0 - ok.astype(jnp.float32))


def eval_step(params: Any, batch: batch_lib.ListBatch, *, config: config_lib.TrainConfig
              ) -> tuple[dict, jax.Array]:
  """Scores a shard with the reranker on the *real* scores; per-list metrics summed.

  Returns:
    ``(sums, logits)``: ``sums`` maps each metric of ``metrics.list_metrics`` (and its
    weights) to its weighted sum over the shard, ``psum``-ed over ``'batch'``;
    ``logits`` ``[B / devices, n]`` for the exact global AUC, computed once per split.
  """
  logits = score_step(params, batch, config=config)
  per_list = metrics_lib.list_metrics(logits, batch.labels, batch.mask,
                                      k=config.eval_k,
                                      map_normaliser=config.map_normaliser)
  sums = metrics_lib.weighted_sums(per_list)
  return jax.lax.psum(sums, data_axes(config)), logits


def score_step(params: Any, batch: batch_lib.ListBatch, *,
               config: config_lib.TrainConfig) -> jax.Array:
  """The reranker's logits of a shard, ``[B / devices, n]``: ``eval_step`` without
  the metrics, for serving (an online request has no labels to sum them over)."""
  reranker, _ = make_players(config)
  return reranker.apply({"params": params}, batch, train=False)
