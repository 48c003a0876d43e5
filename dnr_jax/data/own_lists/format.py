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
    min_id_count: users and items seen fewer times than this (in the lists file,
      its histories and the interactions file, every occurrence counted) share the
      unknown row 0 instead of a row of their own: a bound on the tables of a long
      tail of ids. 1 keeps every id.
    id_buckets: if > 0, user and item ids are hashed into this many rows (1..N;
      row 0 stays padding): tables of a fixed size whatever the catalogue, new ids
      included, at the price of ids sharing rows. 0: one row per id.
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
  min_id_count: int = 1
  id_buckets: int = 0
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
    if self.min_id_count < 1:
      raise ConfigError(f"own_lists.min_id_count={self.min_id_count} must be >= 1 "
                        "(1 keeps every id)")
    if self.id_buckets < 0 or self.id_buckets == 1:
      raise ConfigError(f"own_lists.id_buckets={self.id_buckets} must be 0 (one row "
                        "per id) or >= 2")
    if self.id_buckets and self.min_id_count > 1:
      raise ConfigError(f"own_lists.id_buckets={self.id_buckets} and min_id_count="
                        f"{self.min_id_count}: choose one way of bounding the tables "
                        "(hashing keeps no per-id counts)")
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
