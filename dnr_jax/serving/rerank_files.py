"""Batch reranking of an own-lists file with a trained bundle, streamed to Parquet.

``rerank_file(bundle, lists, output)`` reads the lists chunk by chunk
(``dnr_jax.data.own_lists.read_lists``, the next chunk read in a background thread
while the devices score the current one), scores them on every local device
(``serving.Scorer``), and appends each chunk's rows to a Parquet file: written to a
temporary file in the output's folder and renamed at the end, so a failed run leaves
no partial output. Memory is bounded by a chunk (``chunk_rows`` rows), plus, when the
file has labels, 5 bytes per candidate for the exact global AUC.

Output, one row per real candidate (padding never appears), each list's rows in the
new order:

==================  =======================================================
``list_id``         the list's raw id (as in the input)
``item_id``         the candidate's raw id
``upstream_score``  the upstream score the reranker read (after
                    ``score_transform``)
``reranker_score``  the reranker's logit (higher = shown first)
``rank``            the new 1-based rank (ties broken by upstream position)
``upstream_position``  the candidate's 1-based position in the upstream order
``label``           the feedback (only when the input has labels)
==================  =======================================================
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

from dnr_jax import errors
from dnr_jax import metrics as metrics_lib
from dnr_jax.protocol import report as report_lib
from dnr_jax.runtime import pipeline
from dnr_jax.serving.bundle import Bundle
from dnr_jax.serving.scorer import Scorer, rerank

COLUMNS = ("list_id", "item_id", "upstream_score", "reranker_score", "rank",
           "upstream_position")


def data_config(bundle: Bundle, *, lists: str,
                interactions: Optional[str] = None, chunk_rows: Optional[int] = None):
  """The bundle's ``OwnListsConfig`` pointed at new files (sizes, prefixes kept)."""
  from dnr_jax.data import own_lists  # pylint: disable=g-import-not-at-top
  if not bundle.data_config:
    raise errors.CheckpointError(
        f"{bundle.directory or 'bundle'}: no own-lists data config (the run was not "
        "trained on own lists with experiments.lists); rerank reads own-lists files")
  known = {f.name for f in dataclasses.fields(own_lists.OwnListsConfig)}
  fields = {k: v for k, v in bundle.data_config.items() if k in known}
  fields.update(lists=lists, interactions=interactions)
  if chunk_rows:
    fields["chunk_rows"] = chunk_rows
  config = own_lists.OwnListsConfig(**fields)
  config.validate()
  n = bundle.meta.get("list_size")
  if n and n != config.list_size:
    raise errors.CheckpointError(f"{bundle.directory}: data config list_size="
                                 f"{config.list_size} but the reranker was trained "
                                 f"on n={n}")
  return config


def _total_rows(path: str) -> Optional[int]:
  if path.lower().endswith((".parquet", ".pq")):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
      return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # pylint: disable=broad-except
      return None     # read_lists reports a damaged file in one line
  return None


def _table(chunk, logits: np.ndarray, top_k: int):
  """The Parquet rows of one chunk, each list's candidates in the new order."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  mask = chunk.arrays["mask"]
  ranks = rerank(logits, mask)
  keep = mask & (ranks <= top_k) if top_k else mask
  lst, slot = np.nonzero(keep)
  # Row order: list by list (file order), then new rank.
  order = np.lexsort((ranks[lst, slot], lst))
  lst, slot = lst[order], slot[order]
  cols = {
      "list_id": pa.array(chunk.list_ids[lst].tolist()),
      "item_id": pa.array(chunk.item_ids[lst, slot].tolist()),
      "upstream_score": pa.array(chunk.arrays["scores"][lst, slot], pa.float32()),
      "reranker_score": pa.array(logits[lst, slot].astype(np.float32), pa.float32()),
      "rank": pa.array(ranks[lst, slot], pa.int32()),
      "upstream_position": pa.array((slot + 1).astype(np.int32), pa.int32()),
  }
  if chunk.has_labels:
    cols["label"] = pa.array(chunk.arrays["labels"][lst, slot].astype(np.int8),
                             pa.int8())
  return pa.table(cols)


class _Progress:
  """A progress line every ``every_s`` seconds: lists, share of rows, lists/s, ETA."""

  def __init__(self, total_rows: Optional[int], every_s: float,
               log: Callable[[str], None]):
    self.total, self.every, self.log = total_rows, every_s, log
    self.t0 = self.last = time.time()

  def __call__(self, lists: int, rows: int, unknown: int, final: bool = False):
    now = time.time()
    if not final and now - self.last < self.every:
      return
    self.last = now
    rate = lists / max(now - self.t0, 1e-9)
    msg = f"reranked {lists:,} lists ({rows:,} rows"
    if self.total:
      share = rows / self.total
      bar = "#" * int(20 * share)
      eta = (now - self.t0) * (1 - share) / max(share, 1e-9)
      msg += f", [{bar:<20}] {100 * share:.0f}%, ETA {eta:.0f}s"
    msg += f") {rate:,.0f} lists/s; unknown ids so far: {unknown:,}"
    self.log(msg)


def rerank_file(bundle: Bundle, lists: str, output: str, *,
                interactions: Optional[str] = None, top_k: int = 0,
                chunk_rows: Optional[int] = None, devices: Optional[tuple] = None,
                batch_size: Optional[int] = None, progress_every_s: float = 5.0,
                log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Reranks every list of ``lists`` with ``bundle``; writes ``output`` (Parquet).

  Args:
    bundle: a trained own-lists bundle (``serving.load_bundle``).
    lists: the lists file (own-lists format; labels optional).
    output: the Parquet file to write (replaced atomically at the end).
    interactions: the interactions file the histories come from (else the lists'
      ``history`` column, else empty histories).
    top_k: keep each list's first ``top_k`` candidates in the new order (0: all).
    chunk_rows: rows read at once (default: the run's data config).
    devices: local devices to score on (default: all).
    batch_size: lists per device step (default: the run's evaluation batch).
    progress_every_s: seconds between progress lines.
    log: where progress lines go.

  Returns:
    ``{"lists", "rows", "written_rows", "seconds", "lists_per_s", "stats",
    "has_labels", "metrics"}``: ``stats`` the reader's ``ReadStats`` summed (unknown
    ids per column, truncated and padded lists); ``metrics`` (labelled input only)
    ``{"reranker": ..., "upstream": ...}``, each ``metrics.Accumulator.results``.

  Raises:
    DNRError: a bad bundle, input file or output path (one line).
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from dnr_jax.data import own_lists  # pylint: disable=g-import-not-at-top
  if top_k < 0:
    raise errors.ConfigError(f"--top_k={top_k} must be >= 0 (0: every candidate)")
  config = data_config(bundle, lists=lists, interactions=interactions,
                       chunk_rows=chunk_rows)
  vocab = bundle.vocabulary()
  out_dir = os.path.dirname(os.path.abspath(output)) or "."
  if not os.path.isdir(out_dir):
    raise errors.ConfigError(f"--output={output}: folder {out_dir} does not exist")
  tmp = os.path.join(out_dir, f".{os.path.basename(output)}.tmp{os.getpid()}")
  try:
    open(tmp, "wb").close()
  except OSError as e:
    raise errors.ConfigError(f"--output={output}: cannot write there ({e.strerror})"
                             ) from e
  history = (own_lists.InteractionHistory.load(interactions, vocab, config)
             if interactions else None)
  scorer = Scorer(bundle, devices=devices, batch_size=batch_size)
  c = bundle.config
  # The reranker, and the upstream order (its scores as logits, ties by position).
  evaluation = {row: metrics_lib.Accumulator(
      k=c.eval_k, map_normaliser=c.map_normaliser, num_items=c.model.num_items,
      batch_size=scorer.batch_size) for row in ("reranker", "upstream")}
  progress = _Progress(_total_rows(lists), progress_every_s, log)
  stats = own_lists.ReadStats()
  writer, schema, has_labels, written = None, None, False, 0
  t0 = time.time()
  log(f"reranking {lists} with {bundle.directory} ({bundle.config.model.backbone}/"
      f"{bundle.config.method}, epoch {bundle.meta.get('best_epoch')}) on "
      f"{scorer.runner.num_devices} device(s), batches of {scorer.batch_size} lists")
  try:
    # The next chunk is read and checked while the devices score this one.
    chunks = pipeline.prefetch(own_lists.read_lists(
        lists, vocab=vocab, config=config, history=history), size=1)
    for chunk in chunks:
      logits, sums = scorer.score(chunk.arrays)
      has_labels = chunk.has_labels
      if has_labels:
        a = pipeline.complete(chunk.arrays)
        evaluation["reranker"].add(logits, a["labels"], a["mask"], a["items"], sums)
        evaluation["upstream"].add(a["scores"], a["labels"], a["mask"], a["items"])
      table = _table(chunk, logits, top_k)
      if schema is None:
        schema = table.schema
        writer = pq.ParquetWriter(tmp, schema)
      elif table.schema != schema:
        table = table.cast(schema)
      writer.write_table(table)
      written += table.num_rows
      stats = stats + chunk.stats
      progress(stats.lists, stats.rows, stats.total_unknown)
    if writer is None:   # read_lists raises on a file without rows; be safe anyway
      pq.write_table(pa.table({c: [] for c in COLUMNS}), tmp)
    else:
      writer.close()
      writer = None
    os.replace(tmp, output)
  finally:
    if writer is not None:
      writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
  seconds = time.time() - t0
  progress(stats.lists, stats.rows, stats.total_unknown, final=True)
  report = {"lists": stats.lists, "rows": stats.rows, "written_rows": written,
            "seconds": seconds, "lists_per_s": stats.lists / max(seconds, 1e-9),
            "stats": stats.as_dict(), "has_labels": has_labels, "metrics": None}
  if has_labels:
    report["metrics"] = {row: acc.results() for row, acc in evaluation.items()}
  return report


def metrics_table(bundle: Bundle, metrics: dict, path_md: str, path_csv: str,
                  title: str) -> str:
  """The training table (``protocol.report.write_table``) of the reranker vs upstream."""
  cfg = bundle.config
  rows = [{"backbone": cfg.model.backbone, "method": cfg.method, "seed": cfg.seed,
           "test": metrics["reranker"]},
          {"backbone": "-", "method": "upstream", "seed": 0,
           "test": metrics["upstream"]}]
  summary = report_lib.summarize(rows, cfg.eval_k)
  return report_lib.write_table(summary, cfg.eval_k, path_md, path_csv, title)
