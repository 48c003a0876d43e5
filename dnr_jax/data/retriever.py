"""The retriever stage: matrix factorisation with sampled negatives, in JAX.

``RetrieverConfig.kind`` chooses the model: ``"mf"`` (this module) or
``"dual_tower"`` (``dnr_jax.data.dual_tower``, trained by the same protocol and
scored through this module's functions).

The paper's retriever (section 3 of ``docs/paper.md``) is MF with embedding size 128,
learning rate 1e-3 and random negative sampling, trained on an 8:2 split and then
frozen; it scores the catalogue and keeps the top ``n``. Its scores,
``sigmoid(u . v + b_item)`` in (0, 1), are the ``x`` that DNR denoises.

The caller decides *which* interactions the retriever sees (the data protocol trains
it on the earliest part of the timeline only, so no reranking list is scored by a
model that saw it); this module only fits, scores and retrieves.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dnr_jax.errors import DataError
from dnr_jax.errors import ConfigError


KINDS = ("mf", "dual_tower")


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
  kind: str = "mf"             # "mf" or "dual_tower" (the paper's App. E.7)
  dim: int = 128               # paper: embedding size 128
  learning_rate: float = 1e-3  # paper: 1e-3
  negatives: int = 4           # random negatives per positive
  batch_size: int = 4096       # positives per step
  epochs: int = 10
  holdout: float = 0.2         # paper: 8:2 split; the held-out part gives the AUC
  weight_decay: float = 0.0
  # Adam on the rows a batch touches only ("lazy" Adam, as TF's LazyAdam and
  # PyTorch's SparseAdam): a step costs O(batch) instead of O(catalogue). Dense
  # Adam rewrites every embedding row and both moments each step, which for a
  # catalogue of millions (KuaiRand-27K) makes the retriever the slowest stage.
  # Rows a batch does not touch keep their moments (dense Adam would decay them).
  # None: lazy when the tables have over 8x the rows a step touches (on small
  # catalogues dense is faster: its whole-table update costs less than the sort).
  sparse_updates: Optional[bool] = None
  seed: int = 0
  tower_history: int = 20      # dual tower: previous positives the user tower reads

  def validate(self) -> None:
    if self.kind not in KINDS:
      raise ConfigError(f"retriever.kind={self.kind!r} is not one of {list(KINDS)}")
    if self.tower_history < 1:
      raise ConfigError(f"retriever.tower_history={self.tower_history} must be >= 1")
    for name in ("dim", "negatives", "batch_size", "epochs"):
      if getattr(self, name) < 1:
        raise ConfigError(f"retriever.{name}={getattr(self, name)} must be >= 1")
    if not 0 < self.holdout < 1:
      raise ConfigError(f"retriever.holdout={self.holdout} must be in (0, 1)")
    if self.learning_rate <= 0:
      raise ConfigError(f"retriever.learning_rate={self.learning_rate} must be > 0")


@flax.struct.dataclass
class MFParams:
  user: jax.Array       # [num_users, dim]
  item: jax.Array       # [num_items, dim]
  item_bias: jax.Array  # [num_items]


def init_params(num_users: int, num_items: int, dim: int, key: jax.Array) -> MFParams:
  ku, ki = jax.random.split(key)
  scale = 1.0 / np.sqrt(dim)
  return MFParams(user=scale * jax.random.normal(ku, (num_users, dim)),
                  item=scale * jax.random.normal(ki, (num_items, dim)),
                  item_bias=jnp.zeros((num_items,)))


def logits(params: MFParams, users: jax.Array, items: jax.Array) -> jax.Array:
  """``u . v + b`` for ``users`` ``[...]`` against ``items`` ``[..., m]`` (or ``[...]``)."""
  u = params.user[users]
  v = params.item[items]
  if items.ndim == users.ndim + 1:
    u = u[..., None, :]
  return (u * v).sum(-1) + params.item_bias[items]


def score(params: MFParams, users: jax.Array, items: jax.Array) -> jax.Array:
  """Retriever scores in (0, 1): ``sigmoid(u . v + b)``."""
  return jax.nn.sigmoid(logits(params, users, items))


@jax.jit
def _score_chunk(params, users, items):
  return score(params, users, items)


def score_lists(params: MFParams, users: np.ndarray, items: np.ndarray,
                chunk: int = 2048) -> np.ndarray:
  """Scores ``[B, n]`` of each list's candidates ``items`` for its ``users`` ``[B]``.

  In chunks of ``chunk`` lists of one compiled shape: scoring materialises
  ``[chunk, n, dim]`` embeddings, which for all of a large log's lists at once would
  not fit in memory.
  """
  users = np.asarray(users, np.int32)
  items = np.asarray(items, np.int32)
  out = np.zeros(items.shape, np.float32)
  for start in range(0, len(users), chunk):
    u, i = users[start:start + chunk], items[start:start + chunk]
    short = chunk - len(u) if len(users) > chunk else 0
    if short:   # pad the last chunk to the compiled shape
      u = np.concatenate([u, np.zeros(short, np.int32)])
      i = np.concatenate([i, np.zeros((short,) + i.shape[1:], np.int32)])
    out[start:start + chunk] = np.asarray(_score_chunk(params, u, i))[:len(u) - short]
  return out


def _loss(params, users, pos, neg):
  lp = logits(params, users, pos)
  ln = logits(params, users, neg)
  return (optax.sigmoid_binary_cross_entropy(lp, jnp.ones_like(lp)).mean()
          + optax.sigmoid_binary_cross_entropy(ln, jnp.zeros_like(ln)).mean())


@functools.partial(jax.jit, static_argnames=("tx", "num_items", "negatives"),
                   donate_argnums=(0, 1))
def _train_step(params, opt_state, users, pos, key, *, tx, num_items, negatives):
  # Uniform random negatives over the catalogue (ids 1..num_items-1), as the paper.
  neg = jax.random.randint(key, pos.shape + (negatives,), 1, num_items)
  loss, grads = jax.value_and_grad(_loss)(params, users, pos, neg)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@flax.struct.dataclass
class LazyAdamState:
  count: jax.Array
  mu: MFParams
  nu: MFParams


def _unique_sum(ids: jax.Array, *grads: jax.Array) -> tuple[jax.Array, ...]:
  """The distinct ``ids`` of a batch (padded with id 0) and each of ``grads`` summed
  over them (one sort serves every table the ids index)."""
  uniq, inverse = jnp.unique(ids, size=ids.shape[0], fill_value=0, return_inverse=True)
  return (uniq,) + tuple(jax.ops.segment_sum(g, inverse.reshape(-1), ids.shape[0])
                         for g in grads)


def _lazy_adam_rows(table, mu, nu, rows, grad, count, *, lr, weight_decay,
                    b1=0.9, b2=0.999, eps=1e-8):
  """AdamW (optax's defaults) on ``rows`` of ``table`` only; the rest is untouched.

  Padding slots of ``rows`` are id 0 with zero gradient: row 0 is the padding id,
  which no positive or negative ever is, so what they write there is never read.
  """
  t = table[rows]
  m = b1 * mu[rows] + (1 - b1) * grad
  v = b2 * nu[rows] + (1 - b2) * grad ** 2
  m_hat = m / (1 - b1 ** count)
  v_hat = v / (1 - b2 ** count)
  new = t - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + weight_decay * t)
  return table.at[rows].set(new), mu.at[rows].set(m), nu.at[rows].set(v)


def _row_loss(u, vp, bp, vn, bn):
  lp = (u * vp).sum(-1) + bp
  ln = (u[:, None, :] * vn).sum(-1) + bn
  return (optax.sigmoid_binary_cross_entropy(lp, jnp.ones_like(lp)).mean()
          + optax.sigmoid_binary_cross_entropy(ln, jnp.zeros_like(ln)).mean())


@functools.partial(jax.jit, static_argnames=("num_items", "negatives", "lr",
                                             "weight_decay"), donate_argnums=(0, 1))
def _lazy_train_step(params, state, users, pos, key, *, num_items, negatives, lr,
                     weight_decay):
  """``_train_step`` with lazy Adam: the same loss, gradients only for touched rows."""
  neg = jax.random.randint(key, pos.shape + (negatives,), 1, num_items)
  u, vp, vn = params.user[users], params.item[pos], params.item[neg]
  bp, bn = params.item_bias[pos], params.item_bias[neg]
  loss, (gu, gvp, gbp, gvn, gbn) = jax.value_and_grad(_row_loss, argnums=(0, 1, 2, 3, 4))(
      u, vp, bp, vn, bn)
  count = state.count + 1
  hp = dict(lr=lr, weight_decay=weight_decay)
  rows_u, g_u = _unique_sum(users, gu)
  items = jnp.concatenate([pos, neg.reshape(-1)])
  rows_i, g_i, g_b = _unique_sum(
      items, jnp.concatenate([gvp, gvn.reshape(-1, gvn.shape[-1])]),
      jnp.concatenate([gbp, gbn.reshape(-1)]))
  user, mu_u, nu_u = _lazy_adam_rows(params.user, state.mu.user, state.nu.user, rows_u,
                                     g_u, count, **hp)
  item, mu_i, nu_i = _lazy_adam_rows(params.item, state.mu.item, state.nu.item, rows_i,
                                     g_i, count, **hp)
  bias, mu_b, nu_b = _lazy_adam_rows(params.item_bias, state.mu.item_bias,
                                     state.nu.item_bias, rows_i, g_b, count, **hp)
  return (MFParams(user=user, item=item, item_bias=bias),
          LazyAdamState(count=count, mu=MFParams(mu_u, mu_i, mu_b),
                        nu=MFParams(nu_u, nu_i, nu_b)), loss)


def sampled_auc(params: MFParams, users: np.ndarray, pos: np.ndarray, num_items: int,
                key: jax.Array) -> float:
  """AUC of held-out positives against one uniform random item each (ties count 1/2)."""
  neg = jax.random.randint(key, pos.shape, 1, num_items)
  sp = logits(params, jnp.asarray(users), jnp.asarray(pos))
  sn = logits(params, jnp.asarray(users), neg)
  return float(jnp.mean(jnp.where(sp > sn, 1.0, jnp.where(sp == sn, 0.5, 0.0))))


def train(users: np.ndarray, items: np.ndarray, *, num_users: int, num_items: int,
          config: RetrieverConfig = RetrieverConfig()) -> tuple[MFParams, dict]:
  """Fits MF on positive (user, item) pairs; returns the parameters and a report.

  Args:
    users, items: ``[N]`` dense ids (from 1) of the positive interactions the
      retriever may see.
    num_users, num_items: vocabulary sizes including the padding id 0.
    config: the retriever's configuration.

  Returns:
    ``(params, report)``; ``report`` has ``heldout_auc`` (on the ``holdout`` share of
    the pairs, against random items), ``train_pairs``, ``heldout_pairs``,
    ``final_loss`` and ``seconds``.
  """
  config.validate()
  users = np.asarray(users, np.int32)
  items = np.asarray(items, np.int32)
  if users.shape != items.shape or users.ndim != 1:
    raise ValueError(f"users {users.shape} and items {items.shape} must be equal 1-D")
  if users.size < 2:
    raise DataError(f"the retriever needs positives to train on; got {users.size} "
                    "before its time cut (too few positive labels: lower --k_core or "
                    "raise --retriever_fraction)")
  if users.min() < 1 or users.max() >= num_users or items.min() < 1 \
      or items.max() >= num_items:
    raise ValueError("user/item ids must lie in 1..num_users-1 / 1..num_items-1")
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(users.size)
  n_hold = max(1, int(round(users.size * config.holdout)))
  hold, fit = perm[:n_hold], perm[n_hold:]
  key = jax.random.PRNGKey(config.seed)
  key, k_init = jax.random.split(key)
  params = init_params(num_users, num_items, config.dim, k_init)
  bs = min(config.batch_size, fit.size)
  sparse = config.sparse_updates
  if sparse is None:
    sparse = num_users + num_items > 8 * bs * (2 + config.negatives)
  if sparse:
    opt_state = LazyAdamState(count=jnp.zeros((), jnp.int32),   # mu, nu: own buffers
                              mu=jax.tree.map(jnp.zeros_like, params),  # (donated)
                              nu=jax.tree.map(jnp.zeros_like, params))
    step = functools.partial(_lazy_train_step, num_items=num_items,
                             negatives=config.negatives, lr=config.learning_rate,
                             weight_decay=config.weight_decay)
  else:
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    opt_state = tx.init(params)
    step = functools.partial(_train_step, tx=tx, num_items=num_items,
                             negatives=config.negatives)
  steps = fit.size // bs
  t0 = time.time()
  loss = jnp.nan
  for epoch in range(config.epochs):
    order = fit[rng.permutation(fit.size)][:steps * bs].reshape(steps, bs)
    for s in range(steps):
      key, k = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, users[order[s]],
                                     items[order[s]], k)
    logging.info("retriever epoch %d/%d loss=%.4f (%.0fs)", epoch + 1, config.epochs,
                 float(loss), time.time() - t0)
  auc = sampled_auc(params, users[hold], items[hold], num_items, key)
  report = {"heldout_auc": auc, "train_pairs": int(fit.size), "lazy_adam": bool(sparse),
            "heldout_pairs": int(hold.size), "final_loss": float(loss),
            "seconds": time.time() - t0}
  logging.info("retriever: held-out AUC %.4f on %d pairs", auc, hold.size)
  return params, report


@functools.partial(jax.jit, static_argnames=("n",))
def _top_n(params, users, exclude, *, n):
  s = logits(params, users, jnp.broadcast_to(jnp.arange(params.item.shape[0]),
                                             users.shape + (params.item.shape[0],)))
  s = s.at[:, 0].set(-jnp.inf)                       # padding id
  rows = jnp.arange(users.shape[0])[:, None]
  s = s.at[rows, exclude].set(-jnp.inf)              # exclude[.] == 0 hits padding
  top, idx = jax.lax.top_k(s, n)
  return idx.astype(jnp.int32), jax.nn.sigmoid(top)


def top_n(params: MFParams, users: np.ndarray, exclude: np.ndarray, n: int,
          chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The retriever's top ``n`` items per user, best first, excluding ``exclude``.

  Args:
    params: a trained retriever.
    users: ``[B]`` user ids.
    exclude: ``[B, E]`` item ids not to retrieve (e.g. the user's history); 0 pads.
    n: how many to keep (``n < num_items - E``).
    chunk: users scored at once (memory: ``chunk x num_items`` floats).

  Returns:
    ``(items [B, n] int32, scores [B, n] float32)``, scores non-increasing.
  """
  num_items = params.item.shape[0]
  # Scoring a chunk materialises [chunk, num_items] floats: keep it under ~256 MB
  # for catalogues of millions of items.
  chunk = max(1, min(chunk, (1 << 26) // num_items))
  if n > num_items - 1 - exclude.shape[-1]:
    raise DataError(f"n={n} exceeds the {num_items - 1} items minus "
                    f"{exclude.shape[-1]} excluded: too few items for lists of this "
                    "size (lower --list_size)")
  items, scores = [], []
  for start in range(0, len(users), chunk):
    u = np.asarray(users[start:start + chunk], np.int32)
    e = np.asarray(exclude[start:start + chunk], np.int32)
    short = chunk - len(u)
    if short:  # one compiled shape for every chunk
      u = np.concatenate([u, np.zeros(short, np.int32)])
      e = np.concatenate([e, np.zeros((short,) + e.shape[1:], np.int32)])
    i, s = _top_n(params, u, e, n=n)
    items.append(np.asarray(i)[:chunk - short])
    scores.append(np.asarray(s)[:chunk - short])
  return np.concatenate(items), np.concatenate(scores).astype(np.float32)
