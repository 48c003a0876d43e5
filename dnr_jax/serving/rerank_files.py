"""Batch reranking of an own-lists file with a trained bundle, streamed to Parquet.

``rerank_file(bundle, lists, output)`` reads the lists chunk by chunk
(``dnr_jax.data.own_lists.read_lists``, the next chunk read in a background thread
while the devices score the current one), scores them on every local device
(``serving.Scorer``), and appends each chunk's rows to a Parquet file: written to a
temporary file in the output's folder (``.<output>.tmp<pid>``) and renamed at the
end, so a failed run leaves no partial output. Memory is bounded by a chunk
(``chunk_rows`` rows), plus, when the file has labels, 5 bytes per candidate for the
exact global AUC.

SIGINT (Ctrl-C) and SIGTERM are stop requests (``runtime.preemption``), checked
between chunks: the chunk in flight finishes, the read-ahead thread is waited for,
the temporary file is removed and ``errors.Interrupted`` is raised. Python's own
Ctrl-C, a ``KeyboardInterrupt`` raised wherever the main thread is, can land in the
middle of a multi-device step: one device then waits at a collective for a partner
that never comes, and after 40 s XLA aborts the process (``rendezvous.cc ...
Termination timeout ... exceeded``, exit -6), leaving the temporary file; SIGTERM's
default killed the process at once, leaving it too. A run killed outright (SIGKILL)
still leaves its temporary file; the next run into the same folder removes those of
processes that no longer exist.

Output, one row per input candidate (padding never appears), each list's rows in the
new order: the reranked ones (the upstream's first ``n``, the reranker's input) by
the reranker, then the candidates beyond ``n`` in upstream order, not reranked:

==================  =======================================================
``list_id``         the list's raw id (as in the input)
``item_id``         the candidate's raw id
``upstream_score``  the upstream score the reranker read (after
                    ``score_transform``)
``reranker_score``  the reranker's logit (higher = shown first)
``rank``            the new 1-based rank (ties broken by upstream position);
                    beyond ``n`` it continues in upstream order (``n + 1``, ...)
``upstream_position``  the candidate's 1-based position in the upstream order
``reranked``        True for the first ``n`` (the reranker ranked them), False
                    beyond (``reranker_score`` is null there)
``label``           the feedback (only when the input has labels)
==================  =======================================================
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import os
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
from absl import logging

from dnr_jax import errors
from dnr_jax import metrics as metrics_lib
from dnr_jax.protocol import report as report_lib
from dnr_jax.runtime import pipeline
from dnr_jax.runtime import preemption
from dnr_jax.serving.bundle import Bundle
from dnr_jax.serving.scorer import Scorer, rerank

COLUMNS = ("list_id", "item_id", "upstream_score", "reranker_score", "rank",
           "upstream_position", "reranked")
TMP_MARK = ".tmp"


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
  """The Parquet rows of one chunk: each list's reranked candidates in the new order,
  then its candidates beyond ``n`` in upstream order."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  mask = chunk.arrays["mask"]
  ranks = rerank(logits, mask)
  lst, slot = np.nonzero(mask)
  cut = chunk.truncated
  parts = {
      "list": [lst], "rank": [ranks[lst, slot]], "position": [slot + 1],
      "item": [chunk.item_ids[lst, slot]], "score": [chunk.arrays["scores"][lst, slot]],
      "logit": [logits[lst, slot].astype(np.float32)],
      "label": [chunk.arrays["labels"][lst, slot]],
      "reranked": [np.ones(len(lst), bool)]}
  if cut is not None and len(cut):
    # A list is cut only when it has more than n candidates, so its reranked ones
    # hold ranks 1 .. n and the rest continue at their upstream position.
    for key, value in (("list", cut.lists), ("rank", cut.positions),
                       ("position", cut.positions), ("item", cut.item_ids),
                       ("score", cut.scores),
                       ("logit", np.zeros(len(cut), np.float32)),
                       ("label", cut.labels), ("reranked", np.zeros(len(cut), bool))):
      parts[key].append(value)
  col = {k: np.concatenate(v) for k, v in parts.items()}
  keep = col["rank"] <= top_k if top_k else np.ones(len(col["rank"]), bool)
  # Row order: list by list (file order), then new rank.
  order = np.lexsort((col["rank"], col["list"]))
  order = order[keep[order]]
  col = {k: v[order] for k, v in col.items()}
  cols = {
      "list_id": pa.array(chunk.list_ids[col["list"]].tolist()),
      "item_id": pa.array(col["item"].tolist()),
      "upstream_score": pa.array(col["score"], pa.float32()),
      "reranker_score": pa.array(col["logit"], pa.float32(), mask=~col["reranked"]),
      "rank": pa.array(col["rank"], pa.int32()),
      "upstream_position": pa.array(col["position"].astype(np.int32), pa.int32()),
      "reranked": pa.array(col["reranked"], pa.bool_()),
  }
  if chunk.has_labels:
    cols["label"] = pa.array(col["label"].astype(np.int8), pa.int8())
  return pa.table(cols)


def remove_stale_temporaries(output: str, log: Callable[[str], None] = logging.info
                             ) -> list[str]:
  """Removes the ``.<output>.tmp<pid>`` files of runs that no longer exist.

  A run killed outright (SIGKILL, a power cut) cannot remove its temporary file;
  nothing else would. A file of a live process (another run writing the same
  output) is left alone. Returns the paths removed.
  """
  out_dir = os.path.dirname(os.path.abspath(output))
  prefix = os.path.join(out_dir, f".{os.path.basename(output)}{TMP_MARK}")
  removed = []
  for path in glob.glob(glob.escape(prefix) + "*"):
    pid = path[len(prefix):]
    if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
      continue
    try:
      os.remove(path)
    except OSError:
      continue
    removed.append(path)
    log(f"removed {path}, the temporary output of an earlier run (pid {pid}) that "
        "did not finish")
  return removed


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True       # someone else's process
  return True


@contextlib.contextmanager
def _read_ahead(chunks: Iterator) -> Iterator[Iterator]:
  """``chunks``, each next one read in a worker thread while the caller works.

  Unlike ``pipeline.prefetch``'s daemon thread, this worker is waited for when the
  block ends (at most the one chunk it is reading), so that a stop never exits the
  interpreter while the thread is inside pyarrow: CPython ends a daemon thread that
  wakes up during finalisation with ``pthread_exit``, which C++ frames need not
  survive.
  """
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dnr-rerank-read")
  end = object()

  def ahead():
    pending = pool.submit(next, chunks, end)
    while True:
      chunk = pending.result()
      if chunk is end:
        return
      pending = pool.submit(next, chunks, end)
      yield chunk

  try:
    yield ahead()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
  """A progress line after the first chunk (the run has started: compiled, reading),
  then every ``every_s`` seconds: lists, share of rows, lists/s, ETA."""

  def __init__(self, total_rows: Optional[int], every_s: float,
               log: Callable[[str], None]):
    self.total, self.every, self.log = total_rows, every_s, log
    self.t0 = self.last = time.time()
    self.lines = 0

  def __call__(self, lists: int, rows: int, unknown: int, final: bool = False):
    now = time.time()
    if not final and self.lines and now - self.last < self.every:
      return
    self.lines += 1
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
    ``{"lists", "rows", "written_rows", "not_reranked_rows", "seconds",
    "lists_per_s", "stats", "has_labels", "metrics"}``: ``not_reranked_rows`` the
    rows written beyond ``n`` (``reranked`` False); ``stats`` the reader's
    ``ReadStats`` summed (unknown ids per column, truncated and padded lists);
    ``metrics`` (labelled input only) ``{"reranker": ..., "upstream": ...}``, each
    ``metrics.Accumulator.results`` over the reranked candidates (as in training).

  Raises:
    DNRError: a bad bundle, input file or output path (one line).
    errors.Interrupted: SIGINT / SIGTERM, between chunks (nothing written).
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from dnr_jax.data import own_lists  # pylint: disable=g-import-not-at-top
  if top_k < 0:
    raise errors.ConfigError(f"--top_k={top_k} must be >= 0 (0: every candidate)")
  check_output(output)
  config = data_config(bundle, lists=lists, interactions=interactions,
                       chunk_rows=chunk_rows)
  vocab = bundle.vocabulary()
  out_dir = os.path.dirname(os.path.abspath(output))
  remove_stale_temporaries(output, log)
  tmp = os.path.join(out_dir, f".{os.path.basename(output)}{TMP_MARK}{os.getpid()}")
  stats = own_lists.ReadStats()
  writer, schema, has_labels, written, not_reranked = None, None, False, 0, 0
  t0 = time.time()
  with preemption.StopRequests(
      then="finishing the current chunk, then stopping (no output is written)") as stop:

    def stop_here(where: str) -> None:
      if stop.requested:
        raise errors.Interrupted(
            f"{stop.requested} received: reranking {lists} stopped {where}; "
            f"nothing written ({output} "
            f"{'left as it was' if os.path.exists(output) else 'not created'})")

    try:
      try:
        open(tmp, "wb").close()
      except OSError as e:
        raise errors.ConfigError(f"--output={output}: cannot write there "
                                 f"({e.strerror})") from e
      history = (own_lists.InteractionHistory.load(interactions, vocab, config)
                 if interactions else None)
      scorer = Scorer(bundle, devices=devices, batch_size=batch_size)
      stop_here("before the first list")
      c = bundle.config
      # The reranker, and the upstream order (its scores as logits, ties by position).
      evaluation = {row: metrics_lib.Accumulator(
          k=c.eval_k, map_normaliser=c.map_normaliser, num_items=c.model.num_items,
          batch_size=scorer.batch_size) for row in ("reranker", "upstream")}
      progress = _Progress(_total_rows(lists), progress_every_s, log)
      log(f"reranking {lists} with {bundle.directory} ({c.model.backbone}/"
          f"{c.method}, epoch {bundle.meta.get('best_epoch')}) on "
          f"{scorer.runner.num_devices} device(s), batches of {scorer.batch_size} "
          "lists")
      # The next chunk is read and checked while the devices score this one.
      with _read_ahead(own_lists.read_lists(
          lists, vocab=vocab, config=config, history=history,
          keep_truncated=True)) as chunks:
        for chunk in chunks:
          logits, sums = scorer.score(chunk.arrays)
          has_labels = chunk.has_labels
          if has_labels:
            a = pipeline.complete(chunk.arrays)
            evaluation["reranker"].add(logits, a["labels"], a["mask"], a["items"],
                                       sums)
            evaluation["upstream"].add(a["scores"], a["labels"], a["mask"],
                                       a["items"])
          table = _table(chunk, logits, top_k)
          if schema is None:
            schema = table.schema
            writer = pq.ParquetWriter(tmp, schema)
          elif table.schema != schema:
            table = table.cast(schema)
          writer.write_table(table)
          written += table.num_rows
          not_reranked += int((~table.column("reranked").to_numpy()).sum())
          stats = stats + chunk.stats
          progress(stats.lists, stats.rows, stats.total_unknown)
          stop_here(f"after {stats.lists:,} lists")
      if writer is None:   # read_lists raises on a file without rows; be safe anyway
        pq.write_table(pa.table({c: [] for c in COLUMNS}), tmp)
      else:
        writer.close()
        writer = None
      seconds = time.time() - t0
      # (A JAX computation too: before the rename, under the stop requests.)
      metrics = ({row: acc.results() for row, acc in evaluation.items()}
                 if has_labels else None)
      progress(stats.lists, stats.rows, stats.total_unknown, final=True)
      stop_here(f"after all {stats.lists:,} lists, before renaming the output")
      os.replace(tmp, output)
    finally:
      if writer is not None:
        writer.close()
      if os.path.exists(tmp):
        os.remove(tmp)
  warn_unknown_items(lists, stats)
  return {"lists": stats.lists, "rows": stats.rows, "written_rows": written,
          "not_reranked_rows": not_reranked,
          "seconds": seconds, "lists_per_s": stats.lists / max(seconds, 1e-9),
          "stats": stats.as_dict(), "has_labels": has_labels, "metrics": metrics}


def check_output(output: str) -> None:
  """Fails at once, in one line, when ``output`` cannot be the Parquet file to write:
  a folder, or in a folder that does not exist (before any reading or scoring)."""
  if os.path.isdir(output):
    raise errors.ConfigError(
        f"--output={output} is a folder; give the Parquet file to write (e.g. "
        f"{os.path.join(output, 'reranked.parquet')})")
  out_dir = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(out_dir):
    raise errors.ConfigError(f"--output={output}: folder {out_dir} does not exist")


def warn_unknown_items(lists: str, stats) -> bool:
  """Logs a WARNING when no candidate item id of ``lists`` is in the vocabulary.

  Then the reranker saw only the unknown id 0: its order means nothing (the wrong
  run, or ids written differently, e.g. ``123`` against ``sku-123``). A count in
  the summary line is easy to miss. Returns whether it warned.
  """
  candidates = stats.rows - stats.truncated_candidates
  unknown = stats.unknown.get("item", 0)
  if not candidates or unknown < candidates:
    return False
  logging.warning("%s: every candidate item id (%d of %d) is unknown to the run's "
                  "vocabulary: the reranker saw none of them (all mapped to 0), so "
                  "its order means nothing; is this the right run, and are the ids "
                  "written as in training?", lists, unknown, candidates)
  return True


def metrics_table(bundle: Bundle, metrics: dict, path_md: str, path_csv: str,
                  title: str) -> str:
  """The training table (``protocol.report.write_table``) of the reranker vs upstream.

  Only what means something for one model on one file: no ΔN@K / p-value column (no
  baseline to test against) and no metric column that no row has (the
  shuffled-scores N@K, which rerank never computes); one seed shows no "±".
  """
  cfg = bundle.config
  rows = [{"backbone": cfg.model.backbone, "method": cfg.method, "seed": cfg.seed,
           "test": metrics["reranker"]},
          {"backbone": "-", "method": "upstream", "seed": 0,
           "test": metrics["upstream"]}]
  summary = report_lib.summarize(rows, cfg.eval_k)
  columns = [key for key, _ in report_lib.COLUMNS
             if any(not np.isnan(r["mean"][key]) for r in summary)]
  return report_lib.write_table(summary, cfg.eval_k, path_md, path_csv, title,
                                columns=columns, p_values=False)
