"""Lists files as online requests: what a client would send for each list.

For replaying a lists file against the service (its benchmark and tests): the
service then scores exactly the arrays ``experiments.rerank`` scores for the file.
"""

from __future__ import annotations

import numpy as np


def request_bodies(chunk, vocab, score_transform: str = "none") -> list[dict]:
  """The request bodies of a lists file's lists, as a client would send them.

  ``chunk`` is a ``dnr_jax.data.own_lists.ListChunk`` (``read_lists``): its first
  ``n`` candidates in upstream order, their scores (as the reranker read them, so a
  ``sigmoid`` file's scores come back as logits), the history the reader built (known
  items only, oldest first; none with a hashed vocabulary, which keeps no raw ids)
  and the feature values, raw ids through ``vocab``.
  """
  a = chunk.arrays
  # A hashed vocabulary keeps no raw ids, so the histories the reader built cannot be
  # turned back into ids: the bodies then carry none.
  item_text = None if vocab.buckets else vocab.columns["item"]
  scores = a["scores"].astype(np.float64)
  if score_transform == "sigmoid":
    # Padding's 0 becomes -inf; only each list's first k scores are sent.
    with np.errstate(divide="ignore"):
      scores = np.log(scores) - np.log1p(-scores)

  def raw(column, ids):
    values = vocab.columns[column]
    # An id the reader mapped to 0 (unknown) has no raw value; any id not in the
    # vocabulary maps to 0 again.
    return [values[i - 1] if i > 0 else f"<unknown {column}>" for i in ids]

  bodies = []
  for i in range(len(chunk)):
    k = int(a["mask"][i].sum())
    features = {c: raw(c, [int(a["user_features"][i, j])])[0]
                for j, c in enumerate(vocab.user_features)}
    features.update({c: raw(c, a["item_features"][i, :k, j].tolist())
                     for j, c in enumerate(vocab.item_features)})
    bodies.append({
        "list_id": chunk.list_ids[i],
        "user_id": chunk.user_ids[i],
        "item_ids": list(chunk.item_ids[i, :k]),
        "scores": [float(s) for s in scores[i, :k]],
        "history": ([] if item_text is None else
                    [item_text[h - 1] for h in a["history"][i][a["history_mask"][i]]]),
        "features": features,
    })
  return bodies
