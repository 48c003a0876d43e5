"""Rating logs as interaction streams: a rating of at least a threshold is a positive.

MovieLens and the Amazon review data have no impressions, only ratings (1..5 stars:
MovieLens' ``rating``, Amazon's ``overall``), and the paper's protocol needs binary
feedback; a rating of at least ``threshold`` (4 by default,
``prepare.DataConfig.rating_threshold``) is a positive, a lower one a negative. Both
builders store a ``log`` table with a user, an item, a rating and a time in seconds
(under the files' own column names); ``log_stream`` turns it into the
``stream.LogStream`` the preparation reads, so the two data sets share the labelling,
the time unit (ms, as KuaiRand's) and the log's warning that a sample is generated.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from absl import logging

from dnr_jax.data import raw
from dnr_jax.data import stream


@dataclasses.dataclass(frozen=True)
class LogColumns:
  """The names of a rating log's columns in its prepared ``log`` table."""
  user: str
  item: str
  rating: str
  time: str   # seconds since the epoch


def check_threshold(threshold: int) -> None:
  if not 1 <= threshold <= 5:
    raise ValueError(f"threshold={threshold} must be a rating in 1..5")


def display_name(builder: raw.RawBuilder, title: str) -> str:
  """``title``, saying so when the prepared data is a generated sample or fixture."""
  if builder.info.metadata.get("is_real", True):
    return title
  kind = "sample" if builder.builder_config.is_sample else "fixture"
  return f"{title} (GENERATED {kind}, NOT the real data)"


def _no_features(ids: np.ndarray) -> np.ndarray:
  return np.zeros((len(ids), 0), np.int32)


def log_stream(builder: raw.RawBuilder, columns: LogColumns, threshold: int,
               title: str,
               user_features: Callable[[np.ndarray], np.ndarray] = _no_features,
               item_features: Callable[[np.ndarray], np.ndarray] = _no_features,
               user_feature_vocab: tuple[int, ...] = (),
               item_feature_vocab: tuple[int, ...] = ()) -> stream.LogStream:
  """The prepared ratings of ``builder`` as a ``stream.LogStream``: label = rating >=
  ``threshold``, time in ms; features as the data set gives them (none by default)."""
  check_threshold(threshold)
  source = builder.as_data_source(split="log")

  def read():
    for i in range(len(source)):
      b = source[i]["log"]
      yield {"user": np.asarray(b[columns.user], np.int64),
             "item": np.asarray(b[columns.item], np.int64),
             "time": np.asarray(b[columns.time], np.int64) * 1000,
             "label": (np.asarray(b[columns.rating]) >= threshold).astype(np.int8)}

  name = display_name(builder, title)
  logging.info("%s: %d ratings; positive = rating >= %d", name,
               builder.info.metadata.get("log_rows", -1), threshold)
  return stream.LogStream(
      name=name, is_real=bool(builder.info.metadata.get("is_real", True)), read=read,
      num_blocks=len(source), user_features=user_features, item_features=item_features,
      user_feature_vocab=user_feature_vocab, item_feature_vocab=item_feature_vocab)
