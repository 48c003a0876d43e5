"""Bounded vocabularies of own lists: --min_id_count and --id_buckets.

Both bound the user and item tables; both are saved with the vocabulary, so reranking
maps ids exactly as training did.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from dnr_jax import errors
from dnr_jax.data import own_lists
from dnr_jax.data.own_lists import sample as own_lists_sample
from dnr_jax.data.own_lists import vocabulary as vocab_lib
from dnr_jax.runtime import pipeline
from dnr_jax.serving import rerank_files

import tiny_runs  # pylint: disable=g-bad-import-order  (tests/tiny_runs.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = tuple(jax.devices()[:2])
N, H = 10, 5


def test_hash_rows_are_stable_across_processes_and_in_range():
  ids = [f"sku-{i}" for i in range(1000)]
  rows = vocab_lib.hash_rows(ids, 97)
  assert rows.min() >= 1 and rows.max() <= 97 and len(set(rows.tolist())) > 80
  code = ("import sys; from dnr_jax.data.own_lists import vocabulary as v; "
          "print(list(v.hash_rows([f'sku-{i}' for i in range(1000)], 97)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": "123"}, cwd=ROOT,
                       check=True).stdout
  assert eval(out) == rows.tolist()   # pylint: disable=eval-used


def test_min_count_drops_rare_ids_to_the_unknown_row(tmp_path):
  values = {"user": [["u1", "u1", "u2"]], "item": [["a", "a", "b", "c", "a", "c"]]}
  vocab = own_lists.Vocabulary.fit(values, min_count=2)
  assert vocab.columns["item"] == ["a", "c"] and vocab.columns["user"] == ["u1"]
  assert vocab.stats["item"] == {"seen": 3, "rows": 3, "dropped": 1}
  ids, unknown = vocab.lookup("item", ["a", "b", "c", "zzz"])
  assert ids.tolist() == [1, 0, 2, 0] and unknown == 2
  vocab.save(str(tmp_path))
  again = own_lists.Vocabulary.load(str(tmp_path))
  assert again == vocab and again.min_count == 2
  assert again.lookup("item", ["a", "b", "c", "zzz"])[0].tolist() == [1, 0, 2, 0]


def test_hashed_ids_have_fixed_rows_and_none_is_unknown(tmp_path):
  values = {"user": [["u1", "u2"]], "item": [[f"i{k}" for k in range(50)]]}
  vocab = own_lists.Vocabulary.fit(values, buckets=16)
  assert vocab.num_items == vocab.num_users == 17 and vocab.columns["item"] == []
  ids, unknown = vocab.lookup("item", ["i3", "never-seen", "", None])
  assert unknown == 0 and 1 <= ids[0] <= 16 and 1 <= ids[1] <= 16
  assert ids[2] == ids[3] == 0                   # missing values stay padding
  assert ids[0] == vocab_lib.hash_rows(["i3"], 16)[0]
  shared = vocab.shared_rows("item")
  assert shared.shape == (17,) and vocab.stats["item"]["ids_in_shared_rows"] == int(
      np.bincount(vocab_lib.hash_rows([f"i{k}" for k in range(50)], 16),
                  minlength=17)[shared].sum())
  vocab.save(str(tmp_path))
  again = own_lists.Vocabulary.load(str(tmp_path))
  assert again.buckets == 16 and again.num_items == 17
  assert again.lookup("item", ["i3", "never-seen"])[0].tolist() == ids[:2].tolist()


@pytest.mark.parametrize("bounds", [{}, {"min_count": 2}, {"buckets": 16}])
def test_the_online_lookup_gives_the_file_lookups_ids(bounds):
  # The online service maps a request's ids with lookup_texts (a dict), a lists file
  # goes through lookup (pyarrow): one id must get one row either way.
  values = {"user": [["u1", "u1", "u2"]], "item": [["a", "a", "b", "c", "a", "c"]],
            "i_cat": [["x", "y", "x"]]}
  vocab = own_lists.Vocabulary.fit(values, item_features=["i_cat"], **bounds)
  for column, texts in [("item", ["a", "b", "c", "zzz", "a", "5"]),
                        ("user", ["u2", "u1", "nobody"]), ("i_cat", ["y", "q", "x"])]:
    ids = vocab.lookup_texts(column, texts)
    assert ids.dtype == np.int32
    assert ids.tolist() == vocab.lookup(column, texts)[0].tolist(), (column, bounds)
  assert vocab.lookup_texts("item", []).tolist() == []
  with pytest.raises(KeyError, match="no vocabulary column 'i_nope'"):
    vocab.lookup_texts("i_nope", ["a"])


@pytest.mark.parametrize("field, value, words", [
    ("min_id_count", 0, "must be >= 1"), ("id_buckets", 1, "must be 0"),
    ("id_buckets", -3, "must be 0")])
def test_bad_bounds_are_refused(field, value, words):
  with pytest.raises(errors.ConfigError, match=words):
    own_lists.OwnListsConfig(**{field: value}).validate()
  with pytest.raises(errors.ConfigError, match="choose one way"):
    own_lists.OwnListsConfig(min_id_count=2, id_buckets=8).validate()


@pytest.fixture(scope="module", params=[{"min_id_count": 30}, {"id_buckets": 24}],
                ids=["min_id_count", "id_buckets"])
def run(request, tmp_path_factory):
  root = tmp_path_factory.mktemp("bounded")
  return tiny_runs.own_lists_run(root, N, H, DEVICES, **request.param), request.param


def test_the_bounded_vocabulary_round_trips_through_rerank(run, tmp_path):
  run, bounds = run
  vocab = run.bundle.vocabulary()
  assert (vocab.min_count, vocab.buckets) == (bounds.get("min_id_count", 1),
                                              bounds.get("id_buckets", 0))
  if "id_buckets" in bounds:
    assert run.bundle.config.model.num_items == bounds["id_buckets"] + 1
  else:
    assert vocab.stats["item"]["dropped"] > 0
  out = tmp_path / "out.parquet"
  report = rerank_files.rerank_file(run.bundle, run.lists, str(out),
                                    interactions=run.inter, devices=DEVICES)
  # The training run's eval logits on the arrays it was prepared with.
  arrays = pipeline.complete(run.arrays)
  logits = tiny_runs.eval_logits(run, DEVICES)
  table = pq.read_table(out)
  table = table.filter(table["reranked"]).to_pydict()
  index = {l: i for i, l in enumerate(dict.fromkeys(table["list_id"]))}
  rows = np.array([index[l] for l in table["list_id"]])
  slots = np.array(table["upstream_position"]) - 1
  np.testing.assert_array_equal(np.array(table["reranker_score"]), logits[rows, slots])
  unknown_items = int(((arrays["items"] == 0) & arrays["mask"]).sum())
  assert report["stats"]["unknown"].get("item", 0) == unknown_items
  if "id_buckets" in bounds:
    assert unknown_items == 0


def test_the_preparation_report_gives_the_shares(tmp_path):
  lists, inter = own_lists_sample.write_example(
      str(tmp_path / "example"), own_lists_sample.ExampleConfig(
          num_users=30, num_items=60, lists_per_user=4, min_candidates=6,
          max_candidates=14))
  for bounds in ({"min_id_count": 30}, {"id_buckets": 24}):
    config = own_lists.OwnListsConfig(lists=lists, interactions=inter, list_size=N,
                                      history_size=H, data_dir=str(tmp_path / "data"),
                                      split="file_order", **bounds)
    data = own_lists.prepare_own_lists(config)
    v = data.report["vocabulary"]
    arrays = {k: np.concatenate([data.splits[s][k] for s in ("train", "valid", "test")])
              for k in data.splits["train"]}
    mask, items = arrays["mask"], arrays["items"]
    positive = mask & (arrays["labels"] > 0)
    assert v["candidates"] == int(mask.sum()) and v["positives"] == int(positive.sum())
    if "min_id_count" in bounds:
      assert v["mode"] == "min_count" and v["candidates_unknown_share"] > 0
      assert v["candidates_unknown_share"] == pytest.approx(
          ((items == 0) & mask).sum() / mask.sum())
      assert v["positives_unknown_share"] == pytest.approx(
          ((items == 0) & positive).sum() / positive.sum())
    else:
      assert v["mode"] == "hashed" and v["candidates_unknown_share"] == 0
      assert 0 < v["candidates_shared_share"] <= 1 and data.num_items == 25
      assert v["tables"]["item"]["seen"] == 60
