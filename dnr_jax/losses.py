"""The terms of the paper's Eq. 5 (NLL = L_z + L_adv + L_x + delta_x) and L_direct.

Each loss is a masked mean over the valid candidates of the batch it sees; under the
train step that is the per-device batch, and the step averages gradients across
devices. Padded candidates never count.

Reranker (theta):   L_theta = L_direct + lambda_m * L_z
Generator (phi):    L_phi   = lambda_adv * L_adv + lambda_x * L_x
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import ndtri

from dnr_jax import config as config_lib


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  w = mask.astype(values.dtype)
  return (values * w).sum() / jnp.maximum(w.sum(), 1.0)


def bce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean binary cross-entropy, ``-mean log q(z | .)`` over valid candidates."""
  return masked_mean(optax.sigmoid_binary_cross_entropy(logits, labels), mask)


def direct_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """``L_direct = -E_{x ~ p_x} log q_theta(z | x)``: BCE on the *real* scores.

  ``logits`` must come from the reranker fed the retriever's scores ``x``. Trains theta.
  """
  return bce(logits, labels, mask)


def denoise_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """``L_z = -E_{x' ~ p_phi} log q_theta(z | x')`` (Eq. 5): BCE on *generated* scores.

  ``logits`` come from the reranker fed ``x'``; the step stops the gradient into the
  generator, so this term trains theta only.
  """
  return bce(logits, labels, mask)


def adversarial_loss(logits: jax.Array, labels: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """``L_adv = E_{x' ~ p_phi} log q_theta(z | x')`` (Eq. 5), i.e. minus ``L_z``.

  Minimised over phi with theta frozen: the generator seeks scores on which the
  reranker's likelihood of the true feedback is low.
  """
  return -bce(logits, labels, mask)


def _soft_histogram(x: jax.Array, w: jax.Array, bins: int, bandwidth: float):
  centres = (jnp.arange(bins) + 0.5) / bins
  k = jnp.exp(-0.5 * ((x[..., None] - centres) / bandwidth) ** 2)
  h = (k * w[..., None]).reshape(-1, bins).sum(0)
  return h / jnp.maximum(h.sum(), 1e-12)


def histogram_kl(gen: jax.Array, real: jax.Array, w: jax.Array, *, bins: int,
                 bandwidth: float) -> jax.Array:
  """``KL(p_gen || p_real)`` between Gaussian-kernel soft histograms on [0, 1].

  Soft (kernel) bins rather than hard ones so the estimate is differentiable in the
  generated scores; a floor of 1e-6 per bin keeps the KL finite where the real
  histogram is empty.
  """
  p = _soft_histogram(gen, w, bins, bandwidth) + 1e-6
  q = _soft_histogram(real, w, bins, bandwidth) + 1e-6
  p, q = p / p.sum(), q / q.sum()
  return jnp.sum(p * (jnp.log(p) - jnp.log(q)))


def _weighted_quantiles(x: jax.Array, w: jax.Array, levels: jax.Array) -> jax.Array:
  x, w = jnp.reshape(x, -1), jnp.reshape(w, -1)
  # Zero-weight entries are sent past every real value so they never become a quantile.
  order = jnp.argsort(jnp.where(w > 0, x, jnp.inf))
  xs, ws = x[order], w[order]
  cdf = jnp.cumsum(ws) / jnp.maximum(ws.sum(), 1e-12)
  idx = jnp.clip(jnp.searchsorted(cdf, levels), 0, x.shape[0] - 1)
  return xs[idx]


def wasserstein_1d(gen: jax.Array, real: jax.Array, w: jax.Array, *,
                   num_quantiles: int = 64) -> jax.Array:
  """1-D Wasserstein-1 distance ``int_0^1 |F_gen^-1(t) - F_real^-1(t)| dt``.

  Estimated on a grid of ``num_quantiles`` mid-point levels of the two weighted
  empirical quantile functions. The gradient reaches the generated scores through
  the sorted gather.
  """
  levels = (jnp.arange(num_quantiles) + 0.5) / num_quantiles
  return jnp.mean(jnp.abs(_weighted_quantiles(gen, w, levels)
                          - _weighted_quantiles(real, w, levels)))


def mmd(gen: jax.Array, real: jax.Array, w: jax.Array, *, bandwidth: float,
        num_features: int = 64) -> jax.Array:
  """Squared MMD with a Gaussian kernel of width ``bandwidth``, by random Fourier features.

  Exact MMD costs O(N^2) in the ``B * n`` candidates (10^5 per batch); the feature
  map makes it linear. The frequencies are the quantiles of N(0, 1 / bandwidth^2) at
  fixed levels, so the estimate is deterministic and needs no key.
  """
  freqs = ndtri((jnp.arange(num_features) + 0.5) / num_features) / bandwidth

  def embed(x):
    phase = x[..., None] * freqs
    f = jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], -1).reshape(-1, 2 * num_features)
    wf = w.reshape(-1, 1)
    return (f * wf).sum(0) / jnp.maximum(wf.sum(), 1e-12)

  return jnp.sum((embed(gen) - embed(real)) ** 2) / num_features


def distribution_loss(generated: jax.Array, real: jax.Array, labels: jax.Array,
                      mask: jax.Array, config: config_lib.LossConfig) -> jax.Array:
  """``L_x = KL(p_phi(x | z) || p_x(x))`` (Eq. 5): generated scores must look real.

  The paper names the term only as "the distributional difference between the
  synthetic scores and the retriever scores" (open point 1); the estimator is
  ``config.lx_estimator``: ``"histogram_kl"`` (the KL itself, on soft histograms),
  ``"wasserstein"`` (1-D W1 by quantiles) or ``"mmd"``. With ``config.lx_per_class``
  the generated scores of positives are matched to the real scores of positives and
  likewise for negatives, each class weighted by its share of the valid candidates:
  the stronger variant, since the generator is conditioned on ``z`` and real scores
  differ by class. Trains phi only (``real`` carries no parameters).

  Args:
    generated: ``[B, n]`` scores ``x'`` from the generator.
    real: ``[B, n]`` retriever scores ``x`` of the same lists.
    labels: ``[B, n]`` feedback ``z``.
    mask: ``[B, n]`` valid candidates.
    config: the loss configuration.

  Returns:
    A scalar, 0 when the two score sets have the same distribution.
  """
  if config.lx_estimator == "histogram_kl":
    dist = lambda g, r, w: histogram_kl(g, r, w, bins=config.lx_bins,
                                        bandwidth=config.lx_bandwidth)
  elif config.lx_estimator == "wasserstein":
    dist = wasserstein_1d
  elif config.lx_estimator == "mmd":
    dist = lambda g, r, w: mmd(g, r, w, bandwidth=config.lx_bandwidth)
  else:
    raise ValueError(f"loss.lx_estimator={config.lx_estimator!r} is not one of "
                     f"{list(config_lib.LX_ESTIMATORS)}")
  real = jax.lax.stop_gradient(real)
  labels = jnp.asarray(labels, jnp.float32)
  valid = jnp.asarray(mask, jnp.float32)
  if not config.lx_per_class:
    return dist(generated, real, valid)
  total = jnp.maximum(valid.sum(), 1.0)
  loss = 0.0
  for cls_w in (valid * labels, valid * (1.0 - labels)):
    # A class absent from the batch has zero share, so its (undefined) distance is
    # multiplied by zero; jnp.where keeps a NaN from leaking into the gradient.
    share = cls_w.sum() / total
    d = dist(generated, real, cls_w)
    loss = loss + jnp.where(share > 0, share * d, 0.0)
  return loss


