"""The one data structure every part of dnr-jax passes around: a batch of lists.

Conventions (every producer of lists must keep them):

* Candidates are stored in **retriever rank order**: position ``j`` of a list is the
  item the retriever ranked ``j``-th (scores non-increasing over valid positions).
  Rerankers read the position as the "initial ranking" feature, and metrics break ties
  in the reranker's logits by this position (a stable sort), which is the paper's
  "ties broken by retriever rank" (open point 6 in ``docs/paper.md``).
* Item and user ids are ``int32`` and start at 1; ``0`` is reserved for padding.
* Padded candidates have ``mask == False``, ``labels == 0`` and ``scores == 0``; they
  never enter a loss or a metric. A list whose mask is all ``False`` (a padding list,
  used to fill the last partial batch) contributes nothing either.
* Candidates are padded last; the history is padded first (right-aligned: its most
  recent item is the last position), so that a window of the last ``k`` positions is
  the user's ``k`` most recent items.

``SCHEMA`` states this once for every writer of list arrays (the prepared data sets,
own lists, the exported reranker's signature).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import flax
import jax.numpy as jnp
import numpy as np

# The names of a ListBatch's fields, in the order every file and signature uses.
FIELDS = ("user", "history", "history_mask", "items", "scores", "labels", "mask",
          "user_features", "item_features")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """One field of the list arrays.

  Attributes:
    dtype: numpy dtype.
    dims: per-list dimensions, by name: ``"n"`` (list size), ``"h"`` (history
      size), ``"fu"`` / ``"fi"`` (user / item feature columns).
    padding: ``"last"`` (valid entries first), ``"first"`` (right-aligned) or
      ``"none"``.
    meaning: one line for a reader of exported files.
  """
  dtype: Any
  dims: tuple[str, ...]
  padding: str
  meaning: str


SCHEMA: dict[str, FieldSpec] = {
    "user": FieldSpec(np.int32, (), "none", "user id (vocabulary id; 0 = unknown / none)"),
    "history": FieldSpec(
        np.int32, ("h",), "first",
        "the user's previous item ids, most recent LAST, right-aligned: padding (0) "
        "comes first; 0 = padding / unknown"),
    "history_mask": FieldSpec(np.bool_, ("h",), "first",
                              "True where history holds a real item (the last ones)"),
    "items": FieldSpec(np.int32, ("n",), "last",
                       "candidate item ids in upstream order (position 0 = upstream's "
                       "first); padding (0) comes last; 0 = padding / unknown"),
    "scores": FieldSpec(np.float32, ("n",), "last",
                        "the upstream (retriever) score of each candidate, in [0, 1]; "
                        "0 for padding"),
    "labels": FieldSpec(np.float32, ("n",), "last",
                        "binary feedback z (1 = positive); 0 for padding"),
    "mask": FieldSpec(np.bool_, ("n",), "last",
                      "True for real candidates, False for padding (padding goes last)"),
    "user_features": FieldSpec(np.int32, ("fu",), "none",
                               "categorical user feature ids, one column per feature"),
    "item_features": FieldSpec(np.int32, ("n", "fi"), "last",
                               "categorical item feature ids, one column per feature"),
}


def array_shapes(*, list_size: int, history_size: int, num_user_features: int,
                 num_item_features: int, batch: Any = None) -> dict[str, tuple]:
  """Each field's full shape, with ``batch`` (any value, e.g. None) as its lead."""
  sizes = {"n": list_size, "h": history_size, "fu": num_user_features,
           "fi": num_item_features}
  return {f: (batch,) + tuple(sizes[d] for d in s.dims) for f, s in SCHEMA.items()}


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
