"""A batch of checked online requests as the reranker's arrays, and its replies.

The inference worker's side of a request (``requests`` is the HTTP process's):
``encode`` maps a batch's raw ids through the run's vocabulary to the
``dnr_jax.batch`` arrays, exactly as ``experiments.rerank`` maps a lists file;
``replies`` turns the batch's logits into one reply per request.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np

from dnr_jax.data.own_lists.histories import right_aligned
from dnr_jax.serving.online.requests import CheckedRequest, RequestLimits


def _split_unknown(ids: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
  """Per request, how many of its ids (concatenated in ``ids``) are unknown (0)."""
  if not len(ids):
    return np.zeros(len(lengths), np.int64)
  owner = np.repeat(np.arange(len(lengths)), lengths)
  return np.bincount(owner, weights=ids == 0, minlength=len(lengths)).astype(np.int64)


def _slots(lengths: Sequence[int]) -> np.ndarray:
  """``[0, 1, ..., k - 1]`` for each ``k`` in ``lengths``, concatenated."""
  lengths = np.asarray(lengths, np.int64)
  starts = np.cumsum(lengths) - lengths
  return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def encode(requests: Sequence[CheckedRequest], vocab, limits: RequestLimits
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The ``dnr_jax.batch`` arrays of a batch of checked requests.

  Candidates are cut to ``n`` in upstream (request) order; ids go through
  ``vocab.lookup_texts`` once per column for the whole batch, to the ids the
  lists-file reader's ``vocab.lookup`` gives them.

  Returns:
    ``(arrays, unknown)``: ``arrays`` the ``batch.FIELDS`` with leading axis the
    requests (labels zero); ``unknown`` per column (``user``, ``item``,
    ``history``, feature names), ``[B]`` counts of unknown ids per request.
  """
  b, n, h = len(requests), limits.list_size, limits.history_size
  kept = [min(len(r.item_ids), n) for r in requests]
  unknown = {}

  def look(column, values, lengths, count_as=None, owners=None):
    """Ids of ``values`` (``lengths[j]`` of them for request ``owners[j]``; default:
    every request in order), their unknown ones counted per request."""
    ids = vocab.lookup_texts(column, values)
    counts = np.zeros(b, np.int64)
    counts[np.arange(b) if owners is None else owners] = _split_unknown(ids, lengths)
    unknown[count_as or column] = unknown.get(count_as or column, 0) + counts
    return ids

  chain = itertools.chain.from_iterable
  lst = np.repeat(np.arange(b), kept)
  slot = _slots(kept)
  items = np.zeros((b, n), np.int32)
  items[lst, slot] = look("item", list(chain(r.item_ids[:k]
                                             for r, k in zip(requests, kept))), kept)
  given = np.fromiter(chain(r.scores[:k] for r, k in zip(requests, kept)),
                      np.float64, count=len(lst))
  if limits.score_transform == "sigmoid":
    # In float64, then cast: the file reader's order, so the two give the same bits.
    given = 1.0 / (1.0 + np.exp(-given))
  scores = np.zeros((b, n), np.float32)
  scores[lst, slot] = given
  mask = np.zeros((b, n), bool)
  mask[lst, slot] = True
  user = look("user", [r.user_id for r in requests], [1] * b)
  user_features = np.zeros((b, len(limits.user_features)), np.int32)
  for j, c in enumerate(limits.user_features):
    have = [i for i, r in enumerate(requests) if c in r.user_features]
    if have:
      user_features[have, j] = look(c, [requests[i].user_features[c] for i in have],
                                    [1] * len(have), owners=have)
  item_features = np.zeros((b, n, len(limits.item_features)), np.int32)
  for j, c in enumerate(limits.item_features):
    have = [i for i, r in enumerate(requests) if c in r.item_features]
    if have:
      lengths = [kept[i] for i in have]
      ids = look(c, list(chain(requests[i].item_features[c][:kept[i]] for i in have)),
                 lengths, owners=have)
      item_features[np.repeat(have, lengths), _slots(lengths), j] = ids
  # Histories: unknown ids dropped, the last H known ones kept, right-aligned (the
  # lists-file reader's rule for its ``history`` column).
  lengths = [len(r.history) for r in requests]
  ids = look("item", list(chain(r.history for r in requests)), lengths, "history")
  history, history_mask = right_aligned(ids, np.repeat(np.arange(b), lengths), b, h)
  arrays = {"user": user.astype(np.int32), "history": history,
            "history_mask": history_mask, "items": items, "scores": scores,
            "labels": np.zeros((b, n), np.float32), "mask": mask,
            "user_features": user_features, "item_features": item_features}
  return arrays, unknown


def replies(requests: Sequence[CheckedRequest], logits: np.ndarray,
            mask: np.ndarray, unknown: Mapping[str, np.ndarray]) -> list[dict]:
  """One reply per request: its candidates in the new order and their logits.

  The reranked candidates come first, ordered by logit (ties by upstream position,
  ``serving.rerank``'s rule), then those past ``n`` in upstream order with a
  ``null`` score.
  """
  from dnr_jax.serving.scorer import rerank_order  # pylint: disable=g-import-not-at-top
  order = rerank_order(logits, mask)
  kept = np.asarray(mask, bool).sum(-1).tolist()
  # One conversion to Python numbers for the whole batch, not one per element.
  logit_rows = np.take_along_axis(np.asarray(logits), order, -1).astype(
      np.float64).tolist()
  orders = order.tolist()
  total_unknown = (sum(unknown.values()) if unknown else np.zeros(len(requests))
                   ).tolist()
  out = []
  for i, r in enumerate(requests):
    k = kept[i]
    raw = r.raw_item_ids if r.raw_item_ids is not None else r.item_ids
    out.append({
        "list_id": r.list_id,
        "item_ids": [raw[j] for j in orders[i][:k]] + list(raw[k:]),
        "scores": logit_rows[i][:k] + [None] * (len(r.item_ids) - k),
        "reranked": k,
        "unknown_ids": int(total_unknown[i]),
    })
  return out
