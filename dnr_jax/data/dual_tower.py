"""The dual-tower retriever: the paper's second retriever (App. E.7), beside MF.

Two towers meet in a dot product, mapped to [0, 1] by a sigmoid, as MF's scores are:

* the **user tower** reads the user's history (the mean of its own embeddings of the
  user's ``tower_history`` previous positive items) and the user's categorical
  features (the mean of their embeddings), through a 2-layer ReLU MLP; it has no
  user-id embedding, so it represents a user by what they did, and keeps up with a
  user's later positives without retraining (MF's user vector is frozen at the cut);
* the **item tower** reads the item id and the item's categorical features the same
  way.

Training follows MF's protocol (``dnr_jax.data.retriever``): only the positives
before the retriever's cut, each against ``negatives`` uniformly random items, binary
cross-entropy, AdamW, the held-out AUC on a random ``holdout`` share of the
positives. A positive's history is the user's positives strictly before it in time,
so training sees the same kind of history the lists give it later: at list time the
user tower reads the user's positives before the list (which the retriever never
trained on, as a production retriever reads fresh history).

Downstream, a ``DualTower`` turns into MF-shaped parameters (``as_mf``: one "user"
row per list, the item tower's output as the item table, zero bias), so scoring and
top-n retrieval share MF's code.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dnr_jax.data import retriever as retriever_lib
from dnr_jax.errors import DataError


@flax.struct.dataclass
class TowerParams:
  hist: jax.Array        # [num_items, d] the user tower's history-item embeddings
  user_feat: jax.Array   # [sum(user vocab), d] user feature codes, column-offset
  item: jax.Array        # [num_items, d] the item tower's id embeddings
  item_feat: jax.Array   # [sum(item vocab), d] item feature codes, column-offset
  user_mlp: tuple        # (w1 [2d, d], b1 [d], w2 [d, d], b2 [d])
  item_mlp: tuple


@dataclasses.dataclass(frozen=True)
class DualTower:
  """A trained dual tower: parameters, the whole catalogue's item vectors, and the
  feature codes (column-offset) both towers read."""
  params: TowerParams
  item_vectors: np.ndarray   # [num_items, d]
  user_codes: np.ndarray     # [num_users, Fu]
  history_size: int

  def user_vectors(self, history: np.ndarray, history_mask: np.ndarray,
                   users: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The user tower ``[B, d]`` for lists of ``users`` with these histories."""
    b = len(users)
    out = np.zeros((b, self.item_vectors.shape[1]), np.float32)
    for s in range(0, b, chunk):
      h, m = history[s:s + chunk], history_mask[s:s + chunk]
      c = self.user_codes[users[s:s + chunk]]
      short = chunk - len(h) if b > chunk else 0
      if short:   # one compiled shape for every chunk
        h, m, c = (np.concatenate([a, np.zeros((short,) + a.shape[1:], a.dtype)])
                   for a in (h, m, c))
      v = np.asarray(_user_tower_jit(self.params, h, m, c))
      out[s:s + chunk] = v[:len(v) - short]
    return out

  def as_mf(self, history: np.ndarray, history_mask: np.ndarray,
            users: np.ndarray) -> retriever_lib.MFParams:
    """MF-shaped parameters whose user row ``b`` is list ``b``'s user tower."""
    return retriever_lib.MFParams(
        user=jnp.asarray(self.user_vectors(history, history_mask, users)),
        item=jnp.asarray(self.item_vectors),
        item_bias=jnp.zeros((self.item_vectors.shape[0],), jnp.float32))


def feature_codes(features: np.ndarray, vocab: Sequence[int]) -> np.ndarray:
  """Per-column feature codes ``[N, F]`` offset into one shared table."""
  offsets = np.concatenate([[0], np.cumsum(vocab)[:-1]]).astype(np.int32)
  return (np.asarray(features, np.int32) + offsets[None, :len(vocab)]).astype(np.int32)


def _mlp_init(key, d_in, d):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, (d_in, d)) * np.sqrt(2.0 / d_in), jnp.zeros((d,)),
          jax.random.normal(k2, (d, d)) * np.sqrt(1.0 / d), jnp.zeros((d,)))


def init_params(num_items: int, user_vocab: int, item_vocab: int, dim: int,
                key: jax.Array) -> TowerParams:
  keys = jax.random.split(key, 6)
  scale = 1.0 / np.sqrt(dim)
  emb = lambda k, n: scale * jax.random.normal(k, (max(n, 1), dim))
  return TowerParams(hist=emb(keys[0], num_items), user_feat=emb(keys[1], user_vocab),
                     item=emb(keys[2], num_items), item_feat=emb(keys[3], item_vocab),
                     user_mlp=_mlp_init(keys[4], 2 * dim, dim),
                     item_mlp=_mlp_init(keys[5], 2 * dim, dim))


def _mlp(p, x):
  w1, b1, w2, b2 = p
  return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def _mean(table, codes, mask=None):
  """Mean of ``table`` rows ``codes [..., F]`` (zeros when F = 0 or nothing valid)."""
  e = table[codes]
  if mask is None:
    mask = jnp.ones(codes.shape, bool)
  e = e * mask[..., None]
  return e.sum(-2) / jnp.maximum(mask.sum(-1, keepdims=True), 1)


def user_tower(params: TowerParams, history, history_mask, user_codes) -> jax.Array:
  """``[B, d]`` from histories ``[B, H]`` (0 pads) and feature codes ``[B, Fu]``."""
  x = jnp.concatenate([_mean(params.hist, history, history_mask & (history > 0)),
                       _mean(params.user_feat, user_codes)], -1)
  return _mlp(params.user_mlp, x)


def item_tower(params: TowerParams, items, item_codes) -> jax.Array:
  """``[..., d]`` from item ids ``[...]`` and their feature codes ``[..., Fi]``."""
  x = jnp.concatenate([params.item[items], _mean(params.item_feat, item_codes)], -1)
  return _mlp(params.item_mlp, x)


_user_tower_jit = jax.jit(user_tower)


@jax.jit
def _item_vectors(params, item_codes):
  return item_tower(params, jnp.arange(item_codes.shape[0]), item_codes)


def _logits(params, batch, items, item_codes):
  u = user_tower(params, batch["history"], batch["history_mask"], batch["user_codes"])
  v = item_tower(params, items, item_codes[items])
  if items.ndim == 2:
    u = u[:, None, :]
  return (u * v).sum(-1)


def _loss(params, batch, neg, item_codes):
  lp = _logits(params, batch, batch["pos"], item_codes)
  ln = _logits(params, batch, neg, item_codes)
  return (optax.sigmoid_binary_cross_entropy(lp, jnp.ones_like(lp)).mean()
          + optax.sigmoid_binary_cross_entropy(ln, jnp.zeros_like(ln)).mean())


@functools.partial(jax.jit, static_argnames=("tx", "num_items", "negatives"),
                   donate_argnums=(0, 1))
def _train_step(params, opt_state, batch, item_codes, key, *, tx, num_items, negatives):
  # Uniform random negatives over the catalogue (ids 1..num_items-1), as MF's.
  neg = jax.random.randint(key, batch["pos"].shape + (negatives,), 1, num_items)
  loss, grads = jax.value_and_grad(_loss)(params, batch, neg, item_codes)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def _auc_counts(params, batch, neg, item_codes):
  sp = _logits(params, batch, batch["pos"], item_codes)
  sn = _logits(params, batch, neg, item_codes)
  return jnp.where(sp > sn, 1.0, jnp.where(sp == sn, 0.5, 0.0)).sum()


class _Histories:
  """The ``size`` previous positives of each pair of a (user, time)-sorted sequence."""

  def __init__(self, users, items, times, size):
    self.users, self.items, self.times, self.size = users, items, times, size

  def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = rows[:, None] - self.size + np.arange(self.size)[None, :]
    ok = idx >= 0
    idx = np.maximum(idx, 0)
    # Strictly earlier in time: positives of the same instant are not each other's
    # history (their order within the instant is arbitrary).
    ok &= (self.users[idx] == self.users[rows, None]) & (
        self.times[idx] < self.times[rows, None])
    return np.where(ok, self.items[idx], 0).astype(np.int32), ok


def train(users: np.ndarray, items: np.ndarray, times: np.ndarray, *, num_users: int,
          num_items: int, user_features: np.ndarray, item_features: np.ndarray,
          user_feature_vocab: Sequence[int], item_feature_vocab: Sequence[int],
          config: retriever_lib.RetrieverConfig) -> tuple[DualTower, dict]:
  """Fits the dual tower on positive (user, item, time) events.

  Args:
    users, items, times: ``[N]`` the positives the retriever may see (dense ids
      from 1, event times).
    num_users, num_items: vocabulary sizes including the padding id 0.
    user_features, item_features: ``[num_users, Fu]`` / ``[num_items, Fi]``
      categorical feature codes of every user and item.
    user_feature_vocab, item_feature_vocab: each feature column's vocabulary size.
    config: dimensions, optimiser, negatives, epochs, ``holdout``, ``tower_history``.

  Returns:
    ``(DualTower, report)``, the report as MF's (``heldout_auc`` etc.).
  """
  config.validate()
  users, items = np.asarray(users, np.int32), np.asarray(items, np.int32)
  times = np.asarray(times, np.int64)
  if not users.shape == items.shape == times.shape or users.ndim != 1:
    raise ValueError(f"users {users.shape}, items {items.shape} and times "
                     f"{times.shape} must be equal 1-D")
  if users.size < 2:
    raise DataError(f"the dual-tower retriever needs positives to train on; got "
                    f"{users.size} before the retriever's cut (too few rows, or raise "
                    "--retriever_fraction)")
  if users.min() < 1 or users.max() >= num_users or items.min() < 1 \
      or items.max() >= num_items:
    raise ValueError("user/item ids must lie in 1..num_users-1 / 1..num_items-1")
  # A canonical order (user, time, item): the history of a positive is the user's
  # positives before it, whatever order the log was read in.
  order = np.lexsort((items, times, users))
  users, items, times = users[order], items[order], times[order]
  histories = _Histories(users, items, times, config.tower_history)
  user_codes = feature_codes(user_features, user_feature_vocab)
  item_codes = jnp.asarray(feature_codes(item_features, item_feature_vocab))
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(users.size)
  n_hold = max(1, int(round(users.size * config.holdout)))
  hold, fit = perm[:n_hold], perm[n_hold:]
  key = jax.random.PRNGKey(config.seed)
  key, k_init = jax.random.split(key)
  params = init_params(num_items, int(sum(user_feature_vocab)),
                       int(sum(item_feature_vocab)), config.dim, k_init)
  tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  opt_state = tx.init(params)
  bs = min(config.batch_size, fit.size)
  steps = fit.size // bs

  def batch_of(rows):
    h, m = histories(rows)
    return {"history": h, "history_mask": m, "user_codes": user_codes[users[rows]],
            "pos": items[rows]}

  t0 = time.time()
  loss = jnp.nan
  for epoch in range(config.epochs):
    order = fit[rng.permutation(fit.size)][:steps * bs].reshape(steps, bs)
    for s in range(steps):
      key, k = jax.random.split(key)
      params, opt_state, loss = _train_step(
          params, opt_state, batch_of(order[s]), item_codes, k, tx=tx,
          num_items=num_items, negatives=config.negatives)
    logging.info("dual-tower retriever epoch %d/%d loss=%.4f (%.0fs)", epoch + 1,
                 config.epochs, float(loss), time.time() - t0)
  # Held-out AUC as MF's: each held-out positive against one uniform random item.
  key, k_neg = jax.random.split(key)
  neg = np.asarray(jax.random.randint(k_neg, hold.shape, 1, num_items))
  right = 0.0
  for s in range(0, hold.size, bs):
    right += float(_auc_counts(params, batch_of(hold[s:s + bs]), neg[s:s + bs],
                               item_codes))
  auc = right / hold.size
  tower = DualTower(params=params,
                    item_vectors=np.asarray(_item_vectors(params, item_codes)),
                    user_codes=user_codes, history_size=config.tower_history)
  report = {"kind": "dual_tower", "heldout_auc": auc, "train_pairs": int(fit.size),
            "heldout_pairs": int(hold.size), "final_loss": float(loss),
            "tower_history": config.tower_history, "seconds": time.time() - t0}
  logging.info("dual-tower retriever: held-out AUC %.4f on %d pairs", auc, hold.size)
  return tower, report
