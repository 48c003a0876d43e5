"""Tests of list construction on a planted log: protocols, leakage, splits, report."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax.runtime import pipeline
from dnr_jax import train
from dnr_jax.data import lists
from dnr_jax.data import retriever
from dnr_jax.data import types

U, I = 120, 100


def _planted_log(seed=0, per_user=120):
  """Users see runs of impressions; clicks follow latent preferences."""
  rng = np.random.default_rng(seed)
  uf, itf = rng.normal(size=(U, 4)), rng.normal(size=(I, 4))
  pref = uf @ itf.T
  users = np.repeat(np.arange(1, U), per_user)
  # Impressions lean towards liked items, as a real feed's would.
  items = np.concatenate([
      rng.choice(np.arange(1, I), per_user, p=np.exp(pref[u, 1:]) / np.exp(pref[u, 1:]).sum())
      for u in range(1, U)])
  p_click = 1 / (1 + np.exp(-(2 * pref[users, items] - 2)))
  label = (rng.random(users.size) < p_click).astype(np.int8)
  time = rng.integers(0, 10**9, users.size)
  order = np.argsort(time, kind="stable")
  return types.Interactions(
      user=users[order].astype(np.int32), item=items[order].astype(np.int32),
      time=time[order].astype(np.int64), label=label[order], columns={},
      user_raw_id=np.arange(U), item_raw_id=np.arange(I),
      user_features=np.zeros((U, 0), np.int32), item_features=np.zeros((I, 0), np.int32),
      name="planted log (generated, not real)", is_real=False)


LOG = _planted_log()
CFG = lists.ListConfig(list_size=10, history_size=8, window=6, min_list_size=5)


def _cut(log, config):
  """Rows [0, cut) of the time-sorted log are the retriever's."""
  return int(np.searchsorted(log.time, lists.retriever_end_of(log.time, config)))


def _retriever(log, config):
  cut = _cut(log, config)
  pos = np.flatnonzero(log.label[:cut] > 0)
  params, report = retriever.train(
      log.user[pos], log.item[pos], num_users=log.num_users, num_items=log.num_items,
      config=retriever.RetrieverConfig(dim=8, learning_rate=3e-2, batch_size=128,
                                       epochs=10))
  return params, report


@functools.lru_cache(maxsize=None)
def _trained():
  """Trained on first use, not while pytest collects (in every worker)."""
  return _retriever(LOG, CFG)


def _params():
  return _trained()[0]


def _report():
  return _trained()[1]


@pytest.mark.parametrize("protocol", ("exposure", "retrieval"))
def test_lists_layout_leakage_and_informative_scores(protocol):
  cfg = dataclasses.replace(CFG, protocol=protocol)
  data = lists.build_lists(LOG, _params(), cfg)
  cut = _cut(LOG, cfg)
  for name, split in data.splits.items():
    arrays = pipeline.complete(split)
    batch_lib.check_batch(batch_lib.ListBatch.from_arrays(
        {k: jnp.asarray(v) for k, v in arrays.items()}))
    s, m = arrays["scores"], arrays["mask"]
    # Candidates in retriever rank order; padding at the end with zeros.
    assert np.all(np.diff(np.where(m, s, -1.0), axis=1) <= 1e-7)
    assert np.all(arrays["items"][~m] == 0) and np.all(arrays["labels"][~m] == 0)
    # Histories never contain padding marked as valid.
    assert np.all(arrays["history"][arrays["history_mask"]] > 0)
  report = data.report
  assert report["retriever_rows"] == cut
  for name in ("train", "valid", "test"):
    assert report[name]["raw_score_auc"] > 0.5, (name, report[name])
  assert sum(report[n]["lists"] for n in ("train", "valid", "test")) == sum(
      len(s["items"]) for s in data.splits.values())


def test_exposure_lists_are_real_impressions_after_the_cutoff():
  data = lists.build_lists(LOG, _params(), CFG)
  cut = _cut(LOG, CFG)
  later = {(u, i, l) for u, i, l in zip(LOG.user[cut:], LOG.item[cut:], LOG.label[cut:])}
  earlier_only = {(u, i) for u, i in zip(LOG.user[:cut], LOG.item[:cut])} - {
      (u, i) for u, i in zip(LOG.user[cut:], LOG.item[cut:])}
  for split in data.splits.values():
    for u, its, lab, m in zip(split["user"], split["items"], split["labels"],
                              split["mask"]):
      for i, l in zip(its[m], lab[m]):
        assert (u, i, int(l)) in later          # a real impression, real label
        assert (u, i) not in earlier_only


def test_retrieval_lists_exclude_history():
  cfg = dataclasses.replace(CFG, protocol="retrieval")
  data = lists.build_lists(LOG, _params(), cfg)
  for split in data.splits.values():
    for hist, hm, its in zip(split["history"], split["history_mask"], split["items"]):
      assert not set(hist[hm]) & set(its)


def test_splits_are_ordered_by_time():
  data = lists.build_lists(LOG, _params(), CFG)
  # Users' histories grow over time: the mean history length is non-decreasing.
  lengths = [data.splits[n]["history_mask"].sum(1).mean() for n in ("train", "test")]
  assert lengths[0] <= lengths[1]


def test_bad_list_config():
  with pytest.raises(ValueError, match="lists.protocol='cascade'"):
    lists.build_lists(LOG, _params(), dataclasses.replace(CFG, protocol="cascade"))
  with pytest.raises(ValueError, match="lists.window=10 must be < lists.list_size"):
    lists.build_lists(LOG, _params(), dataclasses.replace(CFG, protocol="paper", window=10))


def test_paper_protocol_forces_the_next_interactions_in():
  cfg = dataclasses.replace(CFG, protocol="paper")
  data = lists.build_lists(LOG, _params(), cfg)
  train = data.splits["train"]
  # Only the forced items can be positive; every list holds the top n - W picks.
  assert train["mask"].sum(1).min() >= cfg.list_size - cfg.window
  assert train["labels"].sum() > 0


@pytest.mark.slow
def test_dnr_trains_on_built_lists():
  data = lists.build_lists(LOG, _params(), CFG)
  cfg = config_lib.apply_method(config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=16, num_heads=2),
      noise=config_lib.NoiseConfig(generator_hidden=8), num_epochs=2, warmup_epochs=1,
      global_batch_size=64, eval_batch_size=256, log_every_steps=0), "dnr_g")
  result = train.train_and_evaluate(cfg, data, None, devices=tuple(jax.devices()[:2]))
  assert [r["phase"] for r in result["history"]] == ["heuristic", "model"]
  assert np.isfinite(result["test"]["ndcg"])


def test_time_splits_cut_at_the_configured_shares():
  end = lists.retriever_end_of(LOG.time, CFG)
  assert abs((LOG.time < end).mean() - CFG.retriever_fraction) < 0.01
  data = lists.build_lists(LOG, _params(), CFG)
  n = {name: data.report[name]["lists"] for name in lists.SPLITS}
  total = sum(n.values())
  assert abs(n["test"] / total - CFG.test_fraction) < 0.01
  assert abs(n["valid"] / total - CFG.valid_fraction) < 0.01
  assert data.report["time_splits"]["retriever_end"] == end


def test_lists_go_to_the_split_of_their_first_event():
  # 4 users, 40 impressions each at known times, every (user, slot) its own item, so
  # a list's first item names its first event.
  users = np.repeat(np.arange(1, 5), 40)
  slot = np.tile(np.arange(40), 4)
  items = (users - 1) * 40 + slot + 1
  times = slot * 1000 + users          # interleaved users, increasing per user
  order = np.argsort(times, kind="stable")
  log = types.Interactions(
      user=users[order].astype(np.int32), item=items[order].astype(np.int32),
      time=times[order].astype(np.int64), label=(slot[order] % 3 == 0).astype(np.int8),
      columns={}, user_raw_id=np.arange(5), item_raw_id=np.arange(161),
      user_features=np.zeros((5, 0), np.int32), item_features=np.zeros((161, 0), np.int32),
      name="hand log", is_real=False)
  params = retriever.init_params(5, 161, 4, jax.random.PRNGKey(0))
  cfg = lists.ListConfig(list_size=5, history_size=3, min_list_size=1)
  data = lists.build_lists(log, params, cfg)
  splits = lists.TimeSplits(**data.report["time_splits"])
  time_of = dict(zip(items, times))
  bounds = {"train": (splits.retriever_end, splits.valid_start),
            "valid": (splits.valid_start, splits.test_start),
            "test": (splits.test_start, np.inf)}
  for name, (lo, hi) in bounds.items():
    split = data.splits[name]
    assert data.report[name]["lists"] == len(split["user"]) > 0
    for its, m in zip(split["items"], split["mask"]):
      first = min(time_of[i] for i in its[m])
      assert lo <= first < hi, (name, first, lo, hi)
  # Every post-cut impression is in exactly one list, in runs of up to 5.
  listed = np.concatenate([s["items"][s["mask"]] for s in data.splits.values()])
  assert sorted(listed) == sorted(items[times >= splits.retriever_end])


def test_histogram_auc_matches_the_exact_auc():
  rng = np.random.default_rng(0)
  labels = (rng.random((200, 10)) < 0.3).astype(np.float32)
  scores = np.clip(0.5 + 0.2 * (labels - 0.3) + 0.2 * rng.normal(size=labels.shape),
                   0, 1).astype(np.float32)
  mask = rng.random(labels.shape) < 0.9
  stats = lists.ListStats()
  stats.add_split("train", {"labels": labels * mask, "scores": scores * mask,
                            "mask": mask})
  from dnr_jax import metrics  # pylint: disable=g-import-not-at-top
  exact = float(metrics.global_auc(jnp.asarray(scores), jnp.asarray(labels * mask),
                                   jnp.asarray(mask)))
  got = stats.report()["train"]["raw_score_auc"]
  assert abs(got - exact) < 1e-4 and got > 0.6
