"""What a trained run keeps to rerank later: its ``OwnListsConfig`` and ``Vocabulary``.

``<workdir>/data_config.json`` and ``<workdir>/vocab/``: with them the run alone maps
new lists the way it was trained, whatever happens to the prepared data set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from dnr_jax.data.own_lists.format import FORMAT_VERSION, RUN_FILE, OwnListsConfig
from dnr_jax.data.own_lists.vocabulary import Vocabulary
from dnr_jax.errors import DataError


def save_for_run(workdir: str, config: OwnListsConfig, vocab_dir: str,
                 sizes: Mapping[str, Any] | None = None) -> str:
  """Copies the vocabulary into ``<workdir>/vocab/`` and writes
  ``<workdir>/data_config.json`` (the ``OwnListsConfig``, the format version and the
  vocabulary sizes), so that the run alone maps new lists the way it was trained.
  Returns the JSON's path."""
  vocab = Vocabulary.load(vocab_dir)
  vocab.save(os.path.join(workdir, "vocab"))
  path = os.path.join(workdir, RUN_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"format_version": FORMAT_VERSION,
               "data_config": dataclasses.asdict(config), "vocab_dir": "vocab",
               "num_users": vocab.num_users, "num_items": vocab.num_items,
               "user_features": list(vocab.user_features),
               "item_features": list(vocab.item_features),
               "user_feature_vocab": list(vocab.user_feature_vocab),
               "item_feature_vocab": list(vocab.item_feature_vocab),
               **dict(sizes or {})}, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def load_from_run(workdir: str) -> tuple[OwnListsConfig, Vocabulary]:
  """The ``OwnListsConfig`` and ``Vocabulary`` a run recorded (``save_for_run``)."""
  path = os.path.join(workdir, RUN_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    config = OwnListsConfig(**record["data_config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: cannot read the run's data config ({e}); was the run "
                    "trained on own lists (experiments.lists)?") from e
  if record.get("format_version", "").split(".")[0] != FORMAT_VERSION.split(".")[0]:
    raise DataError(f"{path}: format version {record.get('format_version')!r} is not "
                    f"readable by this code (format {FORMAT_VERSION})")
  return config, Vocabulary.load(os.path.join(workdir, record.get("vocab_dir", "vocab")))
