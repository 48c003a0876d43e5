"""Tests of the ranking metrics: hand-computed cases, references, jit."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from dnr_jax import metrics


def _one(logits, labels, mask=None, k=3, **kw):
  logits = jnp.asarray([logits], jnp.float32)
  labels = jnp.asarray([labels], jnp.float32)
  mask = jnp.ones_like(labels, bool) if mask is None else jnp.asarray([mask])
  return {n: float(v[0]) for n, v in metrics.list_metrics(logits, labels, mask, k=k,
                                                          **kw).items()}


def test_hand_case_with_ties_broken_by_retriever_rank():
  # All logits tie: the retriever order (positions 0, 1, 2, ...) is the ranking.
  m = _one([0.0, 0.0, 0.0, 0.0], [0, 1, 0, 1], k=2)
  # One hit in the top 2, two positives: the paper's H@2 = 1 / max(2, 2).
  assert m["hr"] == 0.5 and m["hit_any"] == 1.0
  assert m["precision"] == 0.5 and m["recall"] == 0.5
  np.testing.assert_allclose(m["f1"], 0.5)
  # DCG = 1/log2(3); IDCG = 1 + 1/log2(3).
  np.testing.assert_allclose(m["ndcg"], (1 / math.log2(3)) / (1 + 1 / math.log2(3)),
                             rtol=1e-6)
  # AP@2 = (1/2) / min(2 positives, K=2) = 0.25; with the "hits" normaliser 0.5.
  np.testing.assert_allclose(m["map"], 0.25)
  np.testing.assert_allclose(_one([0.0] * 4, [0, 1, 0, 1], k=2,
                                  map_normaliser="hits")["map"], 0.5)
  # Per-list AUC with all ties is 1/2.
  np.testing.assert_allclose(m["auc"], 0.5)


def test_padding_never_counts_even_with_huge_logits():
  m = _one([9.0, 1.0, 100.0, 0.5], [0, 1, 1, 0], mask=[True, True, False, True], k=1)
  # The padded positive with logit 100 is ignored: top-1 is item 0 (a negative).
  assert m["hr"] == 0.0 and m["hit_any"] == 0.0 and m["ndcg"] == 0.0
  assert m["recall"] == 0.0
  np.testing.assert_allclose(m["auc"], 0.5)   # pairs: (1 vs 0) wrong, (1 vs 3) right
  # Precision divides by min(K, #valid): a list shorter than K is not penalised.
  short = _one([1.0, 0.0, 5.0], [1, 1, 0], mask=[True, True, False], k=3)
  assert short["precision"] == 1.0 and short["ndcg"] == 1.0 and short["hr"] == 1.0


def test_list_without_positive_is_excluded():
  logits = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  labels = jnp.asarray([[0.0, 0.0], [0.0, 1.0]])
  per = metrics.list_metrics(logits, labels, jnp.ones((2, 2), bool), k=1)
  np.testing.assert_array_equal(per["weight"], [0.0, 1.0])
  means = metrics.means(jax.device_get(metrics.weighted_sums(per)))
  assert means["ndcg"] == 1.0 and means["hr"] == 1.0 and means["hit_any"] == 1.0


@pytest.mark.parametrize("logits, labels, k, hr, hit_any, f1", [
    # 8 candidates, 2 positives ranked 1st and 4th, K = 6: the paper's H@6 counts
    # hits / K = 2/6; the binary hit is 1; precision 2/6, recall 1, F1 = 1/2.
    ([8, 7, 6, 5, 4, 3, 2, 1], [1, 0, 0, 1, 0, 0, 0, 0], 6, 2 / 6, 1.0, 0.5),
    # 8 positives of 8 and K = 6: 6 hits / max(6, 8) = 3/4 (= recall here), F1 6/7.
    ([8, 7, 6, 5, 4, 3, 2, 1], [1] * 8, 6, 6 / 8, 1.0, 2 * 1 * 0.75 / 1.75),
    # One positive, ranked 3rd, K = 2: no hit at all.
    ([3, 2, 1, 0], [0, 0, 1, 0], 2, 0.0, 0.0, 0.0),
    # One positive at the top, K = 6: H = 1/6 though the ranking is perfect; the
    # paper's lists have several positives (its H@6 < F1@6 in every row, see the
    # metrics docstring), which this reproduces: 1/6 < F1 = 2 * (1/6) / (7/6) = 2/7.
    ([5, 4, 3, 2, 1, 0, -1, -2], [1, 0, 0, 0, 0, 0, 0, 0], 6, 1 / 6, 1.0, 2 / 7),
])
def test_paper_hit_ratio_and_binary_hit_hand_cases(logits, labels, k, hr, hit_any, f1):
  m = _one(logits, labels, k=k)
  np.testing.assert_allclose(m["hr"], hr, rtol=1e-6)
  assert m["hit_any"] == hit_any
  np.testing.assert_allclose(m["f1"], f1, rtol=1e-6)
  # The paper's H never exceeds F1 when there are at most K positives.
  assert m["hr"] <= m["f1"] + 1e-7 or sum(labels) > k


def _reference(logits, labels, mask, k):
  """A plain-Python reference of the per-list formulas."""
  out = {n: [] for n in ("hr", "hit_any", "precision", "recall", "f1", "ndcg", "map",
                         "auc")}
  for lg, y, m in zip(logits, labels, mask):
    idx = [i for i in sorted(range(len(lg)), key=lambda i: (-lg[i], i)) if m[i]]
    pos = sum(y[i] for i in idx)
    if pos == 0:
      continue
    top = [y[i] for i in idx[:k]]
    hits = sum(top)
    p, r = hits / min(k, len(idx)), hits / pos
    out["hr"].append(hits / max(min(k, len(idx)), pos))
    out["hit_any"].append(float(hits > 0))
    out["precision"].append(p)
    out["recall"].append(r)
    out["f1"].append(2 * p * r / (p + r) if p + r else 0.0)
    dcg = sum(rel / math.log2(rank + 1) for rank, rel in enumerate(top, 1))
    ideal = sorted((y[i] for i in idx), reverse=True)[:k]
    out["ndcg"].append(dcg / sum(rel / math.log2(rank + 1)
                                 for rank, rel in enumerate(ideal, 1)))
    ap, h = 0.0, 0
    for rank, rel in enumerate(top, 1):
      if rel:
        h += 1
        ap += h / rank
    out["map"].append(ap / min(pos, k))
    negs = [i for i in idx if not y[i]]
    if negs:
      pairs = [(1.0 if lg[i] > lg[j] else 0.5 if lg[i] == lg[j] else 0.0)
               for i in idx if y[i] for j in negs]
      out["auc"].append(sum(pairs) / len(pairs))
  return {n: float(np.mean(v)) for n, v in out.items()}


@pytest.mark.parametrize("k", [1, 3, 6, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_references_on_random_lists(k, seed):
  rng = np.random.default_rng(seed)
  b, n = 64, 20
  logits = rng.normal(size=(b, n)).astype(np.float32)
  labels = (rng.random((b, n)) < 0.2).astype(np.float32)
  mask = np.arange(n)[None] < rng.integers(5, n + 1, b)[:, None]
  labels *= mask
  fn = jax.jit(lambda a, c, d: metrics.list_metrics(a, c, d, k=k))
  per = fn(logits, labels, mask)
  chex.assert_shape(list(per.values()), (b,))
  got = metrics.means(jax.device_get(metrics.weighted_sums(per)))
  want = _reference(logits.tolist(), labels.tolist(), mask.tolist(), k)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  # NDCG against scikit-learn, list by list (continuous logits: no ties).
  w = np.asarray(per["weight"]) > 0
  sk = [ndcg_score(labels[i:i + 1, mask[i]], logits[i:i + 1, mask[i]], k=k)
        for i in range(b) if w[i]]
  np.testing.assert_allclose(np.asarray(per["ndcg"])[w], sk, rtol=1e-5)
  # Global AUC against scikit-learn on the pooled valid candidates.
  np.testing.assert_allclose(
      float(jax.jit(metrics.global_auc)(logits, labels, mask)),
      roc_auc_score(labels[mask], logits[mask]), rtol=1e-5)


def test_global_auc_counts_ties_half():
  logits = jnp.asarray([[0.5, 0.5, 0.1, 7.0]])
  labels = jnp.asarray([[1.0, 0.0, 0.0, 1.0]])
  mask = jnp.asarray([[True, True, True, False]])
  # Pairs of the valid positive (0.5) with negatives 0.5 (tie) and 0.1 (right).
  np.testing.assert_allclose(float(metrics.global_auc(logits, labels, mask)), 0.75)


def test_jit_and_eager_agree():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(8, 10)).astype(np.float32)
  labels = (rng.random((8, 10)) < 0.3).astype(np.float32)
  mask = np.ones((8, 10), bool)
  eager = metrics.list_metrics(logits, labels, mask, k=4)
  jitted = jax.jit(lambda a, b, c: metrics.list_metrics(a, b, c, k=4))(logits, labels,
                                                                       mask)
  chex.assert_trees_all_close(eager, jitted)


def test_coverage_hand_case():
  logits = jnp.asarray([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
  items = jnp.asarray([[1, 2, 3], [1, 2, 4]], jnp.int32)
  mask = jnp.asarray([[True, True, True], [True, True, False]])
  # Top-1: item 1 (list 0) and item 2 (list 1; item 4 is padding). Catalogue 1..5.
  np.testing.assert_allclose(
      float(metrics.coverage(logits, mask, items, k=1, num_items=6)), 2 / 5)


def test_bad_map_normaliser():
  with pytest.raises(ValueError, match="map_normaliser='max'"):
    metrics.list_metrics(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2), bool),
                         k=1, map_normaliser="max")
