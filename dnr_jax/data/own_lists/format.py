"""The own-lists format's constants, ``OwnListsConfig`` and the file-type check.

The format itself is specified in the package doc (``dnr_jax.data.own_lists``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from dnr_jax.errors import ConfigError
from dnr_jax.errors import DataError

FORMAT_VERSION = "1.0"
REQUIRED = ("list_id", "user_id", "item_id", "score")
INTERACTION_COLUMNS = ("user_id", "item_id", "time")
SPLITS = ("train", "valid", "test")
SCORE_TRANSFORMS = ("none", "sigmoid")
SPLIT_MODES = ("auto", "column", "time", "file_order")
VOCAB_FILE = "vocab.json"
RUN_FILE = "data_config.json"      # what a trained run records (``save_for_run``)


@dataclasses.dataclass(frozen=True)
class OwnListsConfig:
  """Where your lists are and how they become arrays (see the package doc: the format).

  Attributes:
    lists: the lists file (Parquet or CSV).
    interactions: an optional interactions file the histories come from.
    list_size: ``n``, candidates per list (longer lists are cut, shorter padded).
    history_size: ``H``, history items per list.
    user_prefix / item_prefix: columns with these prefixes are user / item features.
    score_transform: ``none`` (scores must be in [0, 1]) or ``sigmoid`` (logits).
    history_separator: separator of the ids in a CSV ``history`` column.
    split: ``auto`` (the ``split`` column, else ``time``, else file order), or one of
      ``column`` / ``time`` / ``file_order`` explicitly.
    valid_fraction / test_fraction: of the lists, by time (split by time).
    chunk_rows: rows read at once (the reader's memory bound).
    data_dir: where prepared data sets go (default ``raw.default_data_dir()``).
    name: a short description for logs and tables (default: the file's name).
  """
  lists: str | None = None
  interactions: str | None = None
  list_size: int = 50
  history_size: int = 50
  user_prefix: str = "u_"
  item_prefix: str = "i_"
  score_transform: str = "none"
  history_separator: str = "|"
  split: str = "auto"
  valid_fraction: float = 0.1
  test_fraction: float = 0.1
  chunk_rows: int = 1 << 16
  data_dir: str | None = None
  name: str = ""

  def validate(self) -> None:
    for field in ("list_size", "history_size", "chunk_rows"):
      if getattr(self, field) < 1:
        raise ConfigError(f"own_lists.{field}={getattr(self, field)} must be >= 1")
    if self.score_transform not in SCORE_TRANSFORMS:
      raise ConfigError(f"own_lists.score_transform={self.score_transform!r} is not one "
                        f"of {SCORE_TRANSFORMS}")
    if self.split not in SPLIT_MODES:
      raise ConfigError(f"own_lists.split={self.split!r} is not one of {SPLIT_MODES}")
    if not self.user_prefix or not self.item_prefix or \
        self.user_prefix == self.item_prefix:
      raise ConfigError(f"own_lists.user_prefix={self.user_prefix!r} and item_prefix="
                        f"{self.item_prefix!r} must be non-empty and differ")
    if self.valid_fraction <= 0 or self.test_fraction <= 0 or \
        self.valid_fraction + self.test_fraction >= 1:
      raise ConfigError(f"own_lists.valid_fraction={self.valid_fraction} and "
                        f"test_fraction={self.test_fraction} must be > 0 and sum < 1")
    if not self.history_separator:
      raise ConfigError("own_lists.history_separator must not be empty")


def feature_columns(names: Sequence[str], config: OwnListsConfig
                    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The user and item feature columns of a file's header, in file order."""
  return (tuple(c for c in names if c.startswith(config.user_prefix)),
          tuple(c for c in names if c.startswith(config.item_prefix)))


def is_parquet(path: str) -> bool:
  """Whether ``path`` names a Parquet file (``.parquet`` / ``.pq``), else CSV."""
  return path.lower().endswith((".parquet", ".pq"))


def check_path(path: str | None, what: str) -> str:
  """``path`` if it is an existing Parquet or CSV file, else ``DataError``; ``what``
  (``lists`` / ``interactions``) names the file in the message."""
  if not path:
    raise DataError(f"no {what} file given")
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file (the {what} file)")
  if not is_parquet(path) and not path.lower().endswith((".csv", ".csv.gz")):
    raise DataError(f"{path}: unknown file type; the {what} file must be Parquet "
                    "(.parquet, .pq) or CSV (.csv, .csv.gz)")
  return path
