"""Your own lists: the format for lists that your own retriever served, and its reader.

FORMAT SPECIFICATION, version ``FORMAT_VERSION`` (1.0)
=====================================================

**Lists file** (Parquet: ``.parquet`` / ``.pq``; CSV with a header line: ``.csv``, for
small cases). One row per candidate of a served list:

============  ========  ===============================================================
column        required  meaning
============  ========  ===============================================================
``list_id``   yes       the list (one request); any type (int, string, ...)
``user_id``   yes       who the list was served to; any type; one user per list
``item_id``   yes       the candidate; any type; an item appears once per list
``score``     yes       the upstream (retriever) score, finite; in [0, 1] unless
                        ``OwnListsConfig.score_transform="sigmoid"`` (logits)
``label``     training  the feedback, 0 or 1 (bool, int or 0.0 / 1.0); absent at
                        inference
``position``  no        the order the upstream served (any numbers, smaller first,
                        unique within a list); default order: by ``score``
                        descending, ties in file order
``time``      no        when the list was served (a number or a timestamp; the same
                        within a list, and the same unit as the interactions' time)
``split``     no        ``train`` / ``valid`` / ``test`` (the same within a list)
``history``   no        the user's previous items before this list, most recent last:
                        a list-valued column (Parquet) or ids joined by ``|`` (CSV,
                        ``history_separator``); read from the list's first row
``u_*``       no        categorical user features (any type; the same within a
                        list); empty = unknown
``i_*``       no        categorical item features (any type, per row); empty = unknown
============  ========  ===============================================================

Other columns are ignored. **A list's rows must be contiguous** in the file (rows of
one ``list_id`` next to each other, in any order): the reader streams the file in
bounded memory and a list id that reappears after another list is an error.

**Interactions file** (optional; Parquet or CSV): ``user_id``, ``item_id``, ``time``,
optional ``label`` (0/1). When given, a list's history is the user's last ``H``
interactions (``label == 1`` ones only when the file has a ``label`` column) with
``time`` strictly before the list's ``time`` (so the lists need a ``time`` column),
most recent last; ties in time keep file order. It replaces a ``history`` column.
With neither, every history is empty (the models then see no history).

**Ids.** Raw ids (users, items, feature values) are compared as text (an int id ``5``
and the string ``"5"`` are the same id) and map through a ``Vocabulary`` fitted on the
prepared data and saved beside it (``vocab.json``): ids ``1..V-1``, ``0`` = padding /
unknown (the ``dnr_jax.batch`` convention). At inference, unknown users, items,
history items and feature values map to 0 and are *counted* (``ReadStats.unknown``),
never an error. Unknown history items are dropped from the history.

**Lists to arrays.** Candidates are put in upstream order (``position``, else score
descending); lists longer than ``n`` (``list_size``) keep their first ``n`` and are
counted (``truncated_lists``), shorter ones are padded (``mask == False``).

**Splits** (``OwnListsConfig.split``): the ``split`` column when present; else by
``time``: the last ``test_fraction`` (10%) of the lists by time are test, the
``valid_fraction`` (10%) before them valid, as in the project's other protocols
(lists served at the same time as a cut's list go with it); without ``time`` either,
by file order, with a warning.

**Errors.** A bad file raises ``DataError`` with one line naming the file, the row (CSV:
``line`` as an editor shows it; Parquet: 1-based ``row``), the column and the problem:
a missing column or value, a label that is not 0/1, a non-finite or out-of-range
score, a duplicate ``(list_id, item_id)``, a list with several users (or several
times, splits, user features), a list id that reappears, an unknown split name.

Memory: the lists file is streamed in chunks of ``chunk_rows`` rows; an interactions
file is held in memory as 12 bytes per row (its user ids as a dictionary); the
reader remembers the ids of the lists it has seen, to catch non-contiguous lists.

Layout: ``format`` (the constants above, ``OwnListsConfig``, the file-type check),
``sources`` (reading a file in chunks, typed columns), ``vocabulary``
(``Vocabulary``, ``fit_vocabulary``), ``histories`` (``InteractionHistory``),
``reader`` (``read_lists``, ``ListChunk``, ``ReadStats``,
``TruncatedCandidates``), ``run_files`` (``save_for_run``, ``load_from_run``),
``builder`` (``prepare_own_lists``, the cached
``dnr_own_lists`` TFDS data set) and ``sample`` (a generated example, NOT real data).
Importing this package does not import TFDS: ``builder`` and ``sample`` load on first
use of their names.
"""

import importlib

from dnr_jax.data.own_lists.format import (FORMAT_VERSION, INTERACTION_COLUMNS,
                                           REQUIRED, RUN_FILE, SCORE_TRANSFORMS,
                                           SPLIT_MODES, SPLITS, VOCAB_FILE,
                                           OwnListsConfig, check_path,
                                           feature_columns, is_parquet)
from dnr_jax.data.own_lists.histories import InteractionHistory
from dnr_jax.data.own_lists.reader import (ListChunk, ReadStats,
                                          TruncatedCandidates, read_lists)
from dnr_jax.data.own_lists.run_files import load_from_run, save_for_run
from dnr_jax.data.own_lists.sources import Source, header, row_count
from dnr_jax.data.own_lists.vocabulary import Vocabulary, fit_vocabulary

# Names whose modules import TFDS (the builder; the example, through ``raw``): loaded
# on first use (PEP 562), so that reading and reranking lists never pulls TFDS in.
_LAZY = {
    "prepare_own_lists": "builder", "cache_key": "builder", "is_generated": "builder",
    "DnrOwnLists": "builder", "OWN_LISTS_VERSION": "builder",
    "ExampleConfig": "sample", "write_example": "sample", "ensure_example": "sample",
}

__all__ = [
    "FORMAT_VERSION", "INTERACTION_COLUMNS", "REQUIRED", "RUN_FILE",
    "SCORE_TRANSFORMS", "SPLIT_MODES", "SPLITS", "VOCAB_FILE", "OwnListsConfig",
    "check_path", "feature_columns", "is_parquet", "InteractionHistory", "ListChunk",
    "ReadStats", "TruncatedCandidates", "read_lists", "load_from_run",
    "save_for_run", "Source", "header", "row_count", "Vocabulary", "fit_vocabulary",
    # loaded on first use (_LAZY):
    "prepare_own_lists", "cache_key", "is_generated", "DnrOwnLists",
    "OWN_LISTS_VERSION", "ExampleConfig", "write_example", "ensure_example",
]


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
