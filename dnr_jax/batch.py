"""The one data structure every part of dnr-jax passes around: a batch of lists.

Conventions (every producer of lists must keep them):

* Candidates are stored in **retriever rank order**: position ``j`` of a list is the
  item the retriever ranked ``j``-th (scores non-increasing over valid positions).
  Rerankers read the position as the "initial ranking" feature, and metrics break ties
  in the reranker's logits by this position (a stable sort), which is the paper's
  "ties broken by retriever rank" (open point 6 of the paper note).
* Item and user ids are ``int32`` and start at 1; ``0`` is reserved for padding.
* Padded candidates have ``mask == False``, ``labels == 0`` and ``scores == 0``; they
  never enter a loss or a metric. A list whose mask is all ``False`` (a padding list,
  used to fill the last partial batch) contributes nothing either.
"""

from __future__ import annotations

from typing import Any, Mapping

import chex
import flax
import jax.numpy as jnp
import numpy as np

# Field name -> (dtype, trailing shape description) of a ListBatch, in numpy terms.
FIELDS = ("user", "history", "history_mask", "items", "scores", "labels", "mask",
          "user_features", "item_features")


@flax.struct.dataclass
class ListBatch:
  """A batch of ``B`` candidate lists of length ``n`` with histories of length ``H``.

  Attributes:
    user: ``[B]`` int32 user ids (0 when the data set has none).
    history: ``[B, H]`` int32 ids of the user's previous items, most recent last.
    history_mask: ``[B, H]`` bool, True where ``history`` holds a real item.
    items: ``[B, n]`` int32 candidate item ids, in retriever rank order.
    scores: ``[B, n]`` float32 retriever scores ``x`` in [0, 1].
    labels: ``[B, n]`` float32 binary feedback ``z`` (1 = positive).
    mask: ``[B, n]`` bool, True for real candidates, False for padding.
    user_features: ``[B, Fu]`` int32 categorical user feature ids (``Fu`` may be 0).
    item_features: ``[B, n, Fi]`` int32 categorical item feature ids (``Fi`` may be 0).
  """
  user: Any
  history: Any
  history_mask: Any
  items: Any
  scores: Any
  labels: Any
  mask: Any
  user_features: Any
  item_features: Any

  @property
  def batch_size(self) -> int:
    return self.items.shape[-2]

  @property
  def list_size(self) -> int:
    return self.items.shape[-1]

  @property
  def history_size(self) -> int:
    return self.history.shape[-1]

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, Any]) -> "ListBatch":
    """Builds a batch from a mapping with (at least) the non-feature fields.

    Missing ``user``, ``user_features`` and ``item_features`` are filled with zeros
    (no user ids, zero feature columns).
    """
    missing = [k for k in ("history", "history_mask", "items", "scores", "labels",
                           "mask") if k not in arrays]
    if missing:
      raise KeyError(f"ListBatch.from_arrays: missing fields {missing}; "
                     f"got {sorted(arrays)}")
    items = np.asarray(arrays["items"])
    lead = items.shape[:-1]
    user = arrays.get("user")
    if user is None:
      user = np.zeros(lead, np.int32)
    uf = arrays.get("user_features")
    if uf is None:
      uf = np.zeros(lead + (0,), np.int32)
    itf = arrays.get("item_features")
    if itf is None:
      itf = np.zeros(items.shape + (0,), np.int32)
    return cls(user=user, history=arrays["history"],
               history_mask=arrays["history_mask"], items=items,
               scores=arrays["scores"], labels=arrays["labels"], mask=arrays["mask"],
               user_features=uf, item_features=itf)

  def as_dict(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in FIELDS}


def check_batch(batch: ListBatch) -> None:
  """Asserts the shapes and dtypes of a (per-device) batch; cheap, trace-time only."""
  b, n = batch.items.shape[-2:]
  h = batch.history.shape[-1]
  lead = batch.items.shape[:-2]
  chex.assert_shape(batch.user, lead + (b,))
  chex.assert_shape([batch.history, batch.history_mask], lead + (b, h))
  chex.assert_shape([batch.items, batch.scores, batch.labels, batch.mask],
                    lead + (b, n))
  chex.assert_shape(batch.user_features, lead + (b, None))
  chex.assert_shape(batch.item_features, lead + (b, n, None))
  chex.assert_type([batch.user, batch.history, batch.items, batch.user_features,
                    batch.item_features], jnp.int32)
  chex.assert_type([batch.scores, batch.labels], jnp.float32)
  chex.assert_type([batch.mask, batch.history_mask], jnp.bool_)
