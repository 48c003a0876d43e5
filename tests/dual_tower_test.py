"""Tests of the dual-tower retriever: it learns, builds lists, and is cached apart."""

import dataclasses
import functools

import chex
import numpy as np
import pytest

from dnr_jax.data import dual_tower, lists, prepare, retriever, samples, types

U, I = 150, 100
CFG = retriever.RetrieverConfig(kind="dual_tower", dim=16, learning_rate=1e-2,
                                negatives=4, batch_size=256, epochs=8, tower_history=10)


def _planted_log(seed=0, per_user=100):
  """Users of 4 taste groups click items of their group's cluster (p 0.8, else 0.03);
  a user feature and an item feature carry the group and cluster with some noise."""
  rng = np.random.default_rng(seed)
  group, cluster = rng.integers(0, 4, U), rng.integers(0, 4, I)
  users = np.repeat(np.arange(1, U), per_user)
  items = rng.integers(1, I, users.size)
  p_click = np.where(group[users] == cluster[items], 0.8, 0.03)
  label = (rng.random(users.size) < p_click).astype(np.int8)
  time = rng.integers(0, 10**9, users.size)
  order = np.argsort(time, kind="stable")
  noisy = lambda x: np.where(rng.random(x.size) < 0.3, rng.integers(0, 4, x.size), x)
  user_features = noisy(group)[:, None].astype(np.int32)
  item_features = np.stack([noisy(cluster), rng.integers(0, 3, I)], 1).astype(np.int32)
  return types.Interactions(
      user=users[order].astype(np.int32), item=items[order].astype(np.int32),
      time=time[order].astype(np.int64), label=label[order], columns={},
      user_raw_id=np.arange(U), item_raw_id=np.arange(I), user_features=user_features,
      item_features=item_features, user_feature_vocab=(4,), item_feature_vocab=(4, 3),
      name="planted log (generated, not real)", is_real=False)


LOG = _planted_log()
LIST_CFG = lists.ListConfig(list_size=10, history_size=8, window=6, min_list_size=5)


def _train(log, config=CFG):
  end = lists.retriever_end_of(log.time, LIST_CFG)
  early = (log.time < end) & (log.label > 0)
  return dual_tower.train(
      log.user[early], log.item[early], log.time[early], num_users=log.num_users,
      num_items=log.num_items, user_features=log.user_features,
      item_features=log.item_features, user_feature_vocab=log.user_feature_vocab,
      item_feature_vocab=log.item_feature_vocab, config=config)


@functools.lru_cache(maxsize=None)
def _trained():
  """Trained on first use, not while pytest collects (in every worker)."""
  return _train(LOG)


def _tower():
  return _trained()[0]


def _report():
  return _trained()[1]


def test_learns_planted_preferences_from_histories_and_features():
  # The towers never see a user id: the taste comes from the history and features.
  assert _report()["heldout_auc"] > 0.75, _report()   # at most ~0.84 on this log
  assert _report()["kind"] == "dual_tower"
  chex.assert_shape(_tower().item_vectors, (I, CFG.dim))
  hist = np.array([[3, 5, 0], [0, 0, 0]], np.int32)
  mf = _tower().as_mf(hist, hist > 0, np.array([1, 2]))
  s = np.asarray(retriever.score(mf, np.array([0, 1]), np.array([4, 4])))
  assert np.all((s > 0) & (s < 1))


def test_a_history_is_the_earlier_positives_of_the_same_user_only():
  users = np.array([1, 1, 1, 1, 2, 2])
  items = np.array([10, 11, 12, 13, 20, 21])
  times = np.array([5, 6, 6, 9, 1, 2])
  h, m = dual_tower._Histories(users, items, times, 3)(np.arange(6))  # pylint: disable=protected-access
  got = [sorted(set(row[ok])) for row, ok in zip(h, m)]
  # Item 12 happens at the same instant as 11: neither is the other's history.
  assert got == [[], [10], [10], [10, 11, 12], [], [20]]


@pytest.mark.parametrize("protocol", ("exposure", "retrieval"))
def test_lists_built_with_it_are_informative(protocol):
  cfg = dataclasses.replace(LIST_CFG, protocol=protocol)
  data = lists.build_lists(LOG, _tower(), cfg)
  for name, split in data.splits.items():
    s, mask = split["scores"], split["mask"]
    assert np.all((s[mask] > 0) & (s[mask] < 1)), name
    assert np.all(np.diff(np.where(mask, s, -1.0), axis=1) <= 1e-7), name  # rank order
    if protocol == "exposure":
      assert data.report[name]["raw_score_auc"] > 0.6, (name, data.report[name])
    else:
      # Retrieval (top n of the unseen items by the towers' score): on this log users
      # have seen most of the catalogue, so only the mechanics are checked here.
      assert np.all(split["items"] > 0), name
      assert all(len(set(row)) == row.size for row in split["items"]), name


def test_cache_key_includes_the_retriever_choice():
  mf = prepare.DataConfig()
  tower = dataclasses.replace(mf, retriever=dataclasses.replace(mf.retriever,
                                                                kind="dual_tower"))
  assert prepare.cache_key(tower) != prepare.cache_key(mf)
  longer = dataclasses.replace(tower, retriever=dataclasses.replace(
      tower.retriever, tower_history=50))
  assert prepare.cache_key(longer) != prepare.cache_key(tower)
  # MF ignores the tower's fields, so its key (and the lists cached under it) stay.
  assert prepare.cache_key(dataclasses.replace(mf, retriever=dataclasses.replace(
      mf.retriever, tower_history=50))) == prepare.cache_key(mf)


def test_bad_kind_is_named():
  with pytest.raises(ValueError, match="retriever.kind='two_tower'"):
    retriever.RetrieverConfig(kind="two_tower").validate()


@pytest.mark.slow
def test_prepare_lists_with_the_dual_tower(tmp_path):
  config = prepare.DataConfig(
      data_dir=str(tmp_path), k_core=5,
      sample=samples.SampleConfig(num_users=80, num_items=60, rows_per_user=60),
      retriever=dataclasses.replace(CFG, epochs=3, batch_size=512),
      lists=lists.ListConfig(list_size=10, history_size=8, min_list_size=5))
  data = prepare.prepare_lists(config)
  r = data.report["retriever"]
  assert r["kind"] == "dual_tower" and r["tower_history"] == 10
  assert 0 <= r["heldout_auc"] <= 1
  assert all(data.splits[s]["items"].shape[1] == 10 for s in lists.SPLITS)
