"""The two data structures between the data stages and the trainer.

``Interactions`` is a cleaned interaction log (the output of a raw loader, the input of
preprocessing and of the retriever); ``PreparedLists`` is what the trainer consumes:
train / valid / test splits of lists in the ``dnr_jax.batch`` layout, with the
vocabulary sizes the models need and the preparation report.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Interactions:
  """A columnar interaction log, sorted by ``time`` (stable: ties keep file order).

  Ids are dense: users ``1..num_users-1``, items ``1..num_items-1`` (0 is padding);
  ``user_raw_id[u]`` / ``item_raw_id[i]`` give the ids of the source files.

  Attributes:
    user: ``[N]`` int32 dense user ids.
    item: ``[N]`` int32 dense item ids.
    time: ``[N]`` int64 event time in milliseconds since the epoch.
    label: ``[N]`` int8 the binary feedback chosen by the preprocessing config.
    columns: other per-row columns kept from the source (e.g. ``is_click``,
      ``long_view``, ``rating``, ``is_rand``), each ``[N]``.
    user_raw_id: ``[num_users]`` int64, entry 0 unused.
    item_raw_id: ``[num_items]`` int64, entry 0 unused.
    user_features: ``[num_users, Fu]`` int32 categorical feature ids (row 0 padding).
    item_features: ``[num_items, Fi]`` int32 categorical feature ids (row 0 padding).
    user_feature_vocab / item_feature_vocab: vocabulary size of each feature column.
    name: a short description of the source (data set and config).
    is_real: False for generated samples and fixtures; logs must say so.
  """
  user: np.ndarray
  item: np.ndarray
  time: np.ndarray
  label: np.ndarray
  columns: dict[str, np.ndarray]
  user_raw_id: np.ndarray
  item_raw_id: np.ndarray
  user_features: np.ndarray
  item_features: np.ndarray
  user_feature_vocab: tuple[int, ...] = ()
  item_feature_vocab: tuple[int, ...] = ()
  name: str = ""
  is_real: bool = True

  @property
  def num_rows(self) -> int:
    return int(self.user.shape[0])

  @property
  def num_users(self) -> int:
    return int(self.user_raw_id.shape[0])

  @property
  def num_items(self) -> int:
    return int(self.item_raw_id.shape[0])


@dataclasses.dataclass
class PreparedLists:
  """Reranking lists ready for training.

  Attributes:
    splits: ``{"train", "valid", "test"}`` -> dict of numpy arrays with the
      ``dnr_jax.batch.FIELDS`` keys, leading axis = lists (see ``dnr_jax.runtime.pipeline``);
      the training split may instead be a ``data.list_records.ListRecords`` file, read
      from disk batch by batch (``--input=disk``).
    num_items / num_users: vocabulary sizes including the padding id 0.
    user_feature_vocab / item_feature_vocab: per-column vocabulary sizes.
    report: the preparation report (counts, retriever AUC, raw-score AUC per split, ...).
    name: what the data is, for logs.
    is_real: False for the synthetic generator, the embedded sample and fixtures.
  """
  splits: dict[str, dict[str, np.ndarray]]
  num_items: int
  num_users: int
  user_feature_vocab: tuple[int, ...] = ()
  item_feature_vocab: tuple[int, ...] = ()
  report: dict[str, Any] = dataclasses.field(default_factory=dict)
  name: str = ""
  is_real: bool = True
