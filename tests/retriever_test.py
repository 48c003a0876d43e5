"""Tests of the MF retriever: it learns planted preferences, scores, retrieves."""

import chex
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
