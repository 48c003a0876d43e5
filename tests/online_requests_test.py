"""Online requests (dnr_jax.serving.online.requests, batches): checks, arrays, replies.

In-process and without the serve extra: the service's HTTP side is in
online_service_test.py.
"""

import dataclasses
import json
import pickle

import numpy as np
import pytest

from dnr_jax.data import own_lists
from dnr_jax.data.own_lists import sample as own_lists_sample
from dnr_jax.serving.online import batches
from dnr_jax.serving.online import replay
from dnr_jax.serving.online import requests

N, H = 10, 5


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  root = tmp_path_factory.mktemp("online_requests")
  lists, inter = own_lists_sample.write_example(
      str(root / "example"), own_lists_sample.ExampleConfig(
          num_users=30, num_items=60, lists_per_user=4, min_candidates=6,
          max_candidates=14))
  config = own_lists.OwnListsConfig(lists=lists, interactions=inter, list_size=N,
                                    history_size=H, chunk_rows=200)
  vocab = own_lists.fit_vocabulary(config)
  history = own_lists.InteractionHistory.load(inter, vocab, config)
  chunks = list(own_lists.read_lists(lists, vocab=vocab, config=config,
                                     history=history))
  limits = requests.RequestLimits(list_size=N, history_size=H, max_candidates=20,
                                  user_features=vocab.user_features,
                                  item_features=vocab.item_features)
  return vocab, chunks, limits


def _body(**over):
  body = {"user_id": "u1", "item_ids": ["a", "b", "c"], "scores": [0.9, 0.5, 0.1]}
  body.update(over)
  return body


LIMITS = requests.RequestLimits(list_size=2, history_size=3, max_candidates=4,
                                user_features=("u_age",), item_features=("i_cat",))


@pytest.mark.parametrize("body, field, words", [
    (_body(user_id=None), "user_id", "missing"),
    ({"item_ids": ["a"], "scores": [0.5]}, "user_id", "missing"),
    (_body(item_ids=None), "item_ids", "missing"),
    (_body(scores=[0.5, 0.5]), "scores", "2 scores for 3 item_ids"),
    (_body(item_ids=[]), "item_ids", "empty"),
    (_body(item_ids=["a", "b", "c", "d", "e"], scores=[0.1] * 5), "item_ids",
     "5 candidates, more than the 4"),
    (_body(item_ids=["a", 3.7, "c"]), "item_ids[1]", "not 3.7"),
    (_body(item_ids=["a", True, "c"]), "item_ids[1]", "not True"),
    (_body(item_ids=["a", "", "c"]), "item_ids[1]", "empty id"),
    (_body(item_ids=["a", "b", "a"]), "item_ids[2]", "appears twice"),
    (_body(item_ids="abc"), "item_ids", "expected a list"),
    (_body(scores=[0.5, float("nan"), 0.1]), "scores[1]", "non-finite"),
    (_body(scores=[0.5, float("inf"), 0.1]), "scores[1]", "non-finite"),
    (_body(scores=[0.5, 1.5, 0.1]), "scores[1]", "outside [0, 1]"),
    (_body(scores=[0.5, "high", 0.1]), "scores[1]", "expected a number"),
    (_body(scores=[0.5, True, 0.1]), "scores[1]", "expected a number, got True"),
    (_body(scores=[0.5, 0.2, -1e-300]), "scores[2]", "outside [0, 1]"),
    (_body(scores=[0.5, 10**400, 0.1]), "scores[1]", "non-finite score (an integer"),
    ({"lists": [_body()]}, "lists", "post several to /rerank_lists"),
    (_body(history=["a", None]), "history[1]", "not None"),
    (_body(features={"u_age": ["1", "2"]}), "features.u_age", "not ['1', '2']"),
    (_body(features={"i_cat": ["x"]}), "features.i_cat", "1 values for 3"),
    (_body(features={"u_zip": "1"}), "features.u_zip", "not a feature"),
    (_body(color="red"), "color", "unknown field"),
    (_body(user_id="\ud800"), "user_id", "not valid Unicode"),
    (_body(history=["a", "\udfff"]), "history[1]", "not valid Unicode"),
    (_body(features=[]), "features", "expected an object"),
    ([1, 2], "body", "expected a JSON object"),
])
def test_a_bad_request_is_named_in_one_line(body, field, words):
  with pytest.raises(requests.RequestError) as e:
    requests.check_request(body, LIMITS)
  text = str(e.value)
  assert text.startswith(f"{field}: ") and words in text and "\n" not in text


def test_integer_ids_are_their_text_and_come_back_as_sent():
  checked = requests.check_request(
      _body(user_id=17, item_ids=[5, "b", 10**30], history=[5, "x"],
            features={"i_cat": [1, "k", 2]}), LIMITS)
  assert checked.user_id == "17" and checked.item_ids == ["5", "b", str(10**30)]
  assert checked.history == ["5", "x"] and checked.item_features["i_cat"] == ["1", "k", "2"]
  assert checked.raw_item_ids == [5, "b", 10**30]


def test_scores_are_floats_and_a_sum_that_overflows_is_no_error():
  scores = requests.check_request(_body(scores=[0, 1, 0.5]), LIMITS).scores
  assert scores == [0.0, 1.0, 0.5]
  assert all(type(s) is float for s in scores)  # pylint: disable=unidiomatic-typecheck
  logits = requests.RequestLimits(list_size=2, history_size=3, max_candidates=4,
                                  score_transform="sigmoid")
  checked = requests.check_request(_body(scores=[1e308, 1e308, -3]), logits)
  assert checked.scores == [1e308, 1e308, -3.0]
  assert all(type(s) is float for s in checked.scores)  # pylint: disable=unidiomatic-typecheck


def test_a_checked_request_crosses_a_pipe_whole():
  values = {f.name: f"<{f.name}>" for f in dataclasses.fields(requests.CheckedRequest)}
  checked = requests.CheckedRequest(**values)
  assert pickle.loads(pickle.dumps(checked, pickle.HIGHEST_PROTOCOL)) == checked


def test_limits_refuse_max_candidates_below_n():
  with pytest.raises(ValueError, match="max_candidates=3 must be >= the reranker's n=4"):
    requests.RequestLimits(list_size=4, history_size=2, max_candidates=3)


def test_logit_scores_are_accepted_with_the_sigmoid_transform():
  limits = requests.RequestLimits(list_size=2, history_size=3, max_candidates=4,
                                  score_transform="sigmoid")
  checked = requests.check_request(_body(scores=[4.0, -1.0, 0.0]), limits)
  assert checked.scores == [4.0, -1.0, 0.0]


def test_logits_become_the_scores_the_file_reader_gives(example):
  """The sigmoid runs in float64 before the cast, as in the file reader: the same
  bits (applied after a float32 cast, half of these 2,000 scores differ by an ulp)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  vocab, _, limits = example
  limits = dataclasses.replace(limits, score_transform="sigmoid")
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (200, N))
  checked = [requests.check_request(_body(item_ids=[f"i{j}" for j in range(N)],
                                          scores=[float(x) for x in row]), limits)
             for row in logits]
  arrays, _ = batches.encode(checked, vocab, limits)
  np.testing.assert_array_equal(arrays["scores"],
                                (1.0 / (1.0 + np.exp(-logits))).astype(np.float32))


def test_requests_from_a_lists_file_encode_to_the_readers_arrays(example):
  """A lists file replayed as requests gives the arrays experiments.rerank scores."""
  vocab, chunks, limits = example
  for chunk in chunks:
    bodies = replay.request_bodies(chunk, vocab)
    # Through JSON, as a client sends them.
    checked = [requests.check_request(json.loads(json.dumps(b)), limits)
               for b in bodies]
    arrays, unknown = batches.encode(checked, vocab, limits)
    assert set(arrays) == set(chunk.arrays)
    for k, v in chunk.arrays.items():
      if k != "labels":          # a request has none (zeros)
        np.testing.assert_array_equal(arrays[k], v, err_msg=k)
    assert not arrays["labels"].any()
    assert all(int(c.sum()) == 0 for c in unknown.values())


def test_unknown_ids_are_counted_per_request_and_histories_right_aligned(example):
  vocab, _, limits = example
  known = vocab.columns["item"][:4]
  bodies = [
      {"user_id": "nobody", "item_ids": [known[0], "new-1", "new-2"],
       "scores": [0.2, 0.3, 0.4],
       "history": [known[1], "gone", known[2], known[3], known[0], known[1], known[2]]},
      {"user_id": vocab.columns["user"][0], "item_ids": [known[1]], "scores": [1.0],
       "history": ["gone"]},
  ]
  checked = [requests.check_request(b, limits) for b in bodies]
  arrays, unknown = batches.encode(checked, vocab, limits)
  assert unknown["item"].tolist() == [2, 0]
  assert unknown["user"].tolist() == [1, 0]
  assert unknown["history"].tolist() == [1, 1]
  ids = [vocab.lookup("item", [k])[0][0] for k in known]
  # The last H = 5 known items, right-aligned; the unknown one dropped.
  assert arrays["history"][0].tolist() == [ids[2], ids[3], ids[0], ids[1], ids[2]]
  assert arrays["history_mask"][1].tolist() == [False] * H
  assert arrays["items"][0, :3].tolist() == [ids[0], 0, 0]
  assert arrays["mask"].sum(1).tolist() == [3, 1]


def test_replies_order_by_logit_then_keep_the_candidates_past_n_in_upstream_order():
  limits = requests.RequestLimits(list_size=3, history_size=2, max_candidates=5)
  checked = requests.check_request(
      {"user_id": 7, "item_ids": [10, "b", "c", "d", "e"], "scores": [0.1] * 5,
       "list_id": "L"}, limits)
  mask = np.array([[True, True, True]])
  # Candidates 0 and 2 tie: upstream position breaks the tie.
  logits = np.array([[0.5, 0.9, 0.5]], np.float32)
  (reply,) = batches.replies([checked], logits, mask, {"item": np.array([0])})
  assert reply == {"list_id": "L", "item_ids": ["b", 10, "c", "d", "e"],
                   "scores": [pytest.approx(0.9), 0.5, 0.5, None, None],
                   "reranked": 3, "unknown_ids": 0}


def test_a_batch_of_replies_keeps_each_lists_own_length_and_order():
  limits = requests.RequestLimits(list_size=3, history_size=2, max_candidates=5)
  bodies = [{"user_id": 1, "item_ids": ["a", "b", "c", "d", "e"], "scores": [0.1] * 5},
            {"user_id": 2, "item_ids": ["x"], "scores": [0.2], "list_id": 9},
            {"user_id": 3, "item_ids": ["p", "q"], "scores": [0.3, 0.4]}]
  checked = [requests.check_request(b, limits) for b in bodies]
  mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
  logits = np.array([[0.1, 0.3, 0.2], [0.7, 9.0, 9.0], [-1.0, 2.0, 9.0]], np.float32)
  out = batches.replies(checked, logits, mask,
                         {"item": np.array([0, 1, 0]), "user": np.array([1, 0, 0])})
  assert [r["item_ids"] for r in out] == [["b", "c", "a", "d", "e"], ["x"], ["q", "p"]]
  assert [r["scores"] for r in out] == [
      [pytest.approx(0.3), pytest.approx(0.2), pytest.approx(0.1), None, None],
      [pytest.approx(0.7)], [2.0, -1.0]]
  assert [r["reranked"] for r in out] == [3, 1, 2]
  assert [r["unknown_ids"] for r in out] == [1, 1, 0]
  assert [r["list_id"] for r in out] == [None, 9, None]
  assert all(type(x) is float for r in out for x in r["scores"] if x is not None)


def test_a_reply_leaves_the_worker_as_the_json_of_its_values():
  # orjson writes it; what orjson cannot write (an integer past 64 bits, sent as a
  # list_id or an id and given back as sent) falls back to the standard library.
  pytest.importorskip("litserve")
  from dnr_jax.serving.online import api  # pylint: disable=g-import-not-at-top
  reply = {"list_id": "r", "item_ids": ["b", 7, "a"], "scores": [1.5, 1e-7, None],
           "reranked": 2, "unknown_ids": 0}
  for list_id in ("r", 2**70, None):
    body = api.RerankAPI.encode_response({**reply, "list_id": list_id})
    assert isinstance(body, bytes) and b" " not in body
    assert json.loads(body) == {**reply, "list_id": list_id}


def test_features_sent_by_some_requests_of_a_batch_count_per_request(example):
  """Unknown feature values are counted for the request that sent them only."""
  vocab, _, limits = example
  u, i = vocab.user_features[0], vocab.item_features[0]
  item = vocab.columns["item"][0]
  bodies = [
      {"user_id": "x", "item_ids": [item], "scores": [0.5]},
      {"user_id": "x", "item_ids": [item], "scores": [0.5],
       "features": {u: "no-such-value", i: ["no-such-value"]}},
      {"user_id": "x", "item_ids": [item], "scores": [0.5],
       "features": {u: "no-such-value"}},
  ]
  checked = [requests.check_request(b, limits) for b in bodies]
  arrays, unknown = batches.encode(checked, vocab, limits)
  assert unknown[u].tolist() == [0, 1, 1] and unknown[i].tolist() == [0, 1, 0]
  replies = batches.replies(checked, np.zeros((3, N), np.float32), arrays["mask"],
                             unknown)
  # The unknown user "x" in each, plus the request's own unknown feature values.
  assert [r["unknown_ids"] for r in replies] == [1, 3, 2]
