"""Data: raw KuaiRand / MovieLens / Amazon-Books files to cached reranking lists.

One module per stage: ``csv_reader`` and ``json_reader`` (streaming, validated
parsing), ``raw`` (the TFDS builder machinery; ``archives``, ``id_vocab``),
``kuairand``, ``movielens`` and ``amazon_books`` (the data sets; ``ratings``: rating
logs as streams), ``samples`` (generated files in the real schemas, NOT real data),
``preprocess`` (k-core), ``retriever`` (MF), ``lists`` (list protocols), ``prepare``
(``DataConfig``, ``prepare_lists`` and the cached ``dnr_lists`` data set); the
``own_lists`` package (your own lists: the format, specified in the package's doc,
``Vocabulary``, the streaming ``read_lists``; ``own_lists.builder``:
``prepare_own_lists`` and the cached ``dnr_own_lists`` data set; ``own_lists.sample``:
a generated example in that format, NOT real data).

Importing ``dnr_jax.data`` does not import TFDS: its names load their modules on first
use (PEP 562). The preparing modules (``raw``, ``prepare``, ``own_lists.builder``)
import TFDS then; importing ``types`` or ``own_lists`` (the reader) never does.
"""

import importlib

# Public names -> their module, imported on first use (PEP 562), so that
# ``dnr_jax.data.types`` (used by the trainer) does not pull in TFDS.
_EXPORTS = {
    "DataConfig": "prepare", "default_config": "prepare",
    "load_interactions": "prepare", "prepare_lists": "prepare",
    "ListConfig": "lists", "RetrieverConfig": "retriever",
    "Interactions": "types", "PreparedLists": "types",
    "OwnListsConfig": "own_lists", "Vocabulary": "own_lists", "read_lists": "own_lists",
    "prepare_own_lists": "own_lists",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"dnr_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'dnr_jax.data' has no attribute {name!r}")
