"""What the online services' tests share: a tiny run's lists as requests, sent
concurrently, and checked against experiments.rerank's scores for the same lists."""

import concurrent.futures
import socket

import pyarrow.parquet as pq

from dnr_jax.data import own_lists
from dnr_jax.serving import rerank_files
from dnr_jax.serving.online import replay


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def request_bodies(run):
  """Every list of the run's file as a request (first n candidates, read's history)."""
  history = own_lists.InteractionHistory.load(run.inter, run.vocab, run.config)
  bodies = []
  for chunk in own_lists.read_lists(run.lists, vocab=run.vocab, config=run.config,
                                    history=history):
    bodies += replay.request_bodies(chunk, run.vocab)
  return bodies


def concurrently(fn, items, workers=16):
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(fn, items))


def rerank_scores(run, path, devices):
  """``{list_id: [(item, logit), ...]}`` of experiments.rerank's reranked rows, in
  its order, written to ``path``."""
  rerank_files.rerank_file(run.bundle, run.lists, str(path), interactions=run.inter,
                           devices=devices)
  table = pq.read_table(path).filter(pq.read_table(path)["reranked"]).to_pydict()
  want = {}
  for lid, item, score in zip(table["list_id"], table["item_id"],
                              table["reranker_score"]):
    want.setdefault(lid, []).append((item, score))
  return want


def assert_replies_match(bodies, replies, want, atol):
  """Each ``(status, reply)`` to ``bodies`` is 200 with ``want``'s candidates and
  logits within ``atol``, in its order but where two logits tie within it.

  Returns:
    the largest logit difference.
  """
  worst = 0.0
  for body, (status, reply) in zip(bodies, replies):
    assert status == 200, reply
    expected = want[body["list_id"]]
    assert reply["list_id"] == body["list_id"]
    assert reply["reranked"] == len(expected) == len(body["item_ids"])
    got_score = dict(zip(reply["item_ids"], reply["scores"]))
    diff = max(abs(got_score[i] - s) for i, s in expected)
    worst = max(worst, diff)
    assert diff <= atol, (body["list_id"], diff)
    got = reply["item_ids"]
    for k, (item, _) in enumerate(expected):
      if got[k] != item:
        assert abs(got_score[got[k]] - got_score[item]) <= 2 * atol
  return worst
