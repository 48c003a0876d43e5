"""Synthetic reranking lists with a planted truth (for tests and the quick demo).

Users and items have latent preference vectors; a (user, item) pair's true relevance
is their dot product, and the feedback ``z`` is drawn from it. The retriever is
*informative but noisy*: its score is the true relevance plus a persistent, per
(user, item) error of size ``retriever_noise``, squashed to (0, 1). A reranker that
learns the preferences from ids and histories can therefore beat the retriever's own
ranking, and one that also reads the scores can do better still, which is the setting
DNR is built for. Not real data: ``PreparedLists.is_real`` is False.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dnr_jax.data import types
from dnr_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_users: int = 200
  num_items: int = 300
  latent_dim: int = 4
  list_size: int = 20
  history_size: int = 10
  num_lists: tuple[int, int, int] = (2000, 400, 400)  # train, valid, test
  positive_rate: float = 0.2
  retriever_noise: float = 1.0   # std of the retriever's error, in relevance units
  label_sharpness: float = 3.0   # how deterministic z is given the relevance
  # How the retriever's score x comes about (the DNR investigation varies it):
  # "persistent": sigmoid(relevance + e), e fixed per (user, item): a real
  #   retriever's error, the same every time it scores the pair;
  # "fresh": the same with e drawn anew for every impression (noise that ids cannot
  #   explain);
  # "eq4": x = clip((1 - score_lambda) z + score_lambda eps, 0, 1), eps ~ N(0.5, 0.25),
  #   drawn from the feedback itself: DNR's own noise model (Eq. 4, the Gaussian
  #   heuristic), under which its assumptions hold exactly.
  score_model: str = "persistent"
  score_lambda: float = 0.85     # raw-score AUC about 0.70, as the other models
  seed: int = 0


SCORE_MODELS = ("persistent", "fresh", "eq4")


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def generate(config: SyntheticConfig = SyntheticConfig()) -> types.PreparedLists:
  """Draws train / valid / test lists in the ``dnr_jax.batch`` layout."""
  c = config
  if c.score_model not in SCORE_MODELS:
    raise ConfigError(f"score_model={c.score_model!r} is not one of {SCORE_MODELS}")
  if c.list_size > c.num_items - 1 or c.history_size > c.num_items - 1:
    raise ConfigError(f"list_size={c.list_size} and history_size={c.history_size} "
                      f"must be below num_items={c.num_items}")
  rng = np.random.default_rng(c.seed)
  users = rng.normal(size=(c.num_users, c.latent_dim)) / np.sqrt(c.latent_dim)
  items = rng.normal(size=(c.num_items, c.latent_dim))
  relevance = users @ items.T                                   # [U, I]
  relevance = (relevance - relevance.mean()) / relevance.std()
  # Offset so that, after the sharpness, about positive_rate of the pairs are positive.
  offset = np.quantile(relevance, 1.0 - c.positive_rate)
  p_click = _sigmoid(c.label_sharpness * (relevance - offset))
  retriever_error = c.retriever_noise * rng.normal(size=relevance.shape)
  retriever = _sigmoid(relevance - offset + retriever_error)
  # Id 0 is padding: row/column 0 of the tables is never drawn.
  p_click[:, 0] = 0.0
  p_click[0, :] = 0.0

  splits = {}
  for name, size in zip(("train", "valid", "test"), c.num_lists):
    u = rng.integers(1, c.num_users, size)
    # Histories: items the user liked before, drawn in proportion to p_click.
    w = p_click[u] + 1e-9
    hist = np.stack([rng.choice(c.num_items, c.history_size, replace=False,
                                p=wi / wi.sum()) for wi in w])
    cand = np.stack([rng.choice(np.arange(1, c.num_items), c.list_size, replace=False)
                     for _ in range(size)])
    labels = (rng.random(cand.shape) < p_click[u[:, None], cand]).astype(np.float32)
    if c.score_model == "persistent":
      scores = retriever[u[:, None], cand]
    elif c.score_model == "fresh":
      scores = _sigmoid(relevance[u[:, None], cand] - offset
                        + c.retriever_noise * rng.normal(size=cand.shape))
    else:
      eps = 0.5 + 0.25 * rng.normal(size=cand.shape)
      scores = np.clip((1 - c.score_lambda) * labels + c.score_lambda * eps, 0.0, 1.0)
    order = np.argsort(-scores, axis=1, kind="stable")     # retriever rank order
    cand = np.take_along_axis(cand, order, 1)
    scores = np.take_along_axis(scores, order, 1)
    labels = np.take_along_axis(labels, order, 1)
    # Ragged lists: the last candidates of some lists are padding.
    lengths = rng.integers(c.list_size * 3 // 4, c.list_size + 1, size)
    mask = np.arange(c.list_size)[None, :] < lengths[:, None]
    hist_len = rng.integers(1, c.history_size + 1, size)
    hmask = np.arange(c.history_size)[None, :] >= (c.history_size - hist_len)[:, None]
    splits[name] = {
        "user": u.astype(np.int32),
        "history": np.where(hmask, hist, 0).astype(np.int32),
        "history_mask": hmask,
        "items": np.where(mask, cand, 0).astype(np.int32),
        "scores": np.where(mask, scores, 0.0).astype(np.float32),
        "labels": np.where(mask, labels, 0.0).astype(np.float32),
        "mask": mask,
        "user_features": np.zeros((size, 0), np.int32),
        "item_features": np.zeros((size, c.list_size, 0), np.int32),
    }
  return types.PreparedLists(
      splits=splits, num_items=c.num_items, num_users=c.num_users,
      report={"generator": dataclasses.asdict(c)},
      name="synthetic planted-preference lists (generated, not real data)",
      is_real=False)
