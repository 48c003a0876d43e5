"""Tests of the MF retriever: it learns planted preferences, scores, retrieves."""

import chex
import jax
import numpy as np
import pytest

from dnr_jax.data import retriever

U, I = 200, 80


def _planted(seed=0, per_user=10):
  rng = np.random.default_rng(seed)
  uf = rng.normal(size=(U, 4))
  itf = rng.normal(size=(I, 4))
  pref = uf @ itf.T
  pref[:, 0] = -np.inf
  pref[0] = -np.inf
  users, items = [], []
  for u in range(1, U):
    p = np.exp(4 * (pref[u] - pref[u, 1:].max()))
    p /= p.sum()
    chosen = rng.choice(I, per_user, replace=False, p=p)
    users += [u] * per_user
    items += list(chosen)
  return np.array(users), np.array(items)


CFG = retriever.RetrieverConfig(dim=8, learning_rate=3e-2, negatives=4, batch_size=128,
                                epochs=15)


def test_learns_planted_preferences_and_scores_in_unit_interval():
  users, items = _planted()
  params, report = retriever.train(users, items, num_users=U, num_items=I, config=CFG)
  assert report["heldout_auc"] > 0.75, report
  assert report["train_pairs"] + report["heldout_pairs"] == users.size
  s = retriever.score(params, users[:10], items[:10])
  chex.assert_shape(s, (10,))
  assert np.all((np.asarray(s) > 0) & (np.asarray(s) < 1))


def test_top_n_excludes_history_and_padding_and_is_sorted():
  users, items = _planted(1)
  params, _ = retriever.train(users, items, num_users=U, num_items=I,
                              config=CFG.__class__(dim=8, epochs=1, batch_size=256))
  q = np.array([1, 2, 3, 2], np.int32)
  exclude = np.array([[5, 6, 0], [7, 0, 0], [1, 2, 3], [7, 0, 0]], np.int32)
  got, scores = retriever.top_n(params, q, exclude, n=10, chunk=3)
  chex.assert_shape([got, scores], (4, 10))
  for row, ex in zip(got, exclude):
    assert 0 not in row
    assert not set(row) & set(ex[ex > 0])
    assert len(set(row)) == 10
  assert np.all(np.diff(scores, axis=1) <= 0)
  np.testing.assert_array_equal(got[1], got[3])          # same user, same answer
  np.testing.assert_allclose(scores, np.asarray(
      retriever.score(params, q[:, None].repeat(10, 1), got)), rtol=1e-5)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(dim=0), r"retriever\.dim=0"),
    (dict(holdout=1.0), r"retriever\.holdout=1\.0"),
])
def test_bad_config(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    retriever.train(np.array([1, 2]), np.array([1, 2]), num_users=3, num_items=3,
                    config=retriever.RetrieverConfig(**kwargs))


def test_bad_ids():
  with pytest.raises(ValueError, match="ids must lie"):
    retriever.train(np.array([1, 5]), np.array([1, 2]), num_users=3, num_items=3)


def test_lazy_adam_equals_dense_adam_when_every_row_is_touched():
  # 4 users x 3 items, each batch holds every user and (as positives) every item, and
  # the 1 negative per pair covers whatever it draws: with weight decay 0, Adam on the
  # touched rows only is Adam on all rows, as long as all rows are touched.
  users = np.array([1, 2, 3, 1, 2, 3], np.int32)
  items = np.array([1, 2, 3, 2, 3, 1], np.int32)
  cfg = dict(dim=4, learning_rate=1e-2, negatives=1, batch_size=6, epochs=3,
             holdout=0.01, seed=1)
  dense, _ = retriever.train(np.r_[users, 1], np.r_[items, 1], num_users=4, num_items=4,
                             config=retriever.RetrieverConfig(sparse_updates=False, **cfg))
  lazy, _ = retriever.train(np.r_[users, 1], np.r_[items, 1], num_users=4, num_items=4,
                            config=retriever.RetrieverConfig(sparse_updates=True, **cfg))
  for a, b in zip((dense.user, dense.item, dense.item_bias),
                  (lazy.user, lazy.item, lazy.item_bias)):
    np.testing.assert_allclose(np.asarray(a)[1:], np.asarray(b)[1:], rtol=2e-5,
                               atol=1e-6)


def test_lazy_adam_leaves_untouched_rows_alone():
  params, _ = retriever.train(np.array([1, 1, 2]), np.array([1, 2, 1]), num_users=3,
                              num_items=50, config=retriever.RetrieverConfig(
                                  dim=4, negatives=1, batch_size=2, epochs=1,
                                  holdout=0.34, sparse_updates=True))
  init = retriever.init_params(3, 50, 4, jax.random.split(jax.random.PRNGKey(0))[1])
  moved = np.abs(np.asarray(params.item) - np.asarray(init.item)).sum(1) > 0
  assert 0 < moved.sum() < 50      # some rows trained, most never drawn
