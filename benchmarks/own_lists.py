r"""Benchmark: how fast the own-lists reader streams a large lists file, in what memory.

  python -m benchmarks.own_lists --lists=20000 --workdir=/tmp/own_lists_bench

Writes a lists file of ``--lists`` lists of ``--candidates`` rows each (string list,
user and item ids, a score, a label, a served position, a time, 2 user and 2 item
feature columns; random contents, NOT real data) as Parquet, and an interactions file
of ``--interactions_per_user`` rows per user, then times

1. ``fit_vocabulary`` (one streamed pass over both files);
2. ``InteractionHistory.load``;
3. ``read_lists`` over the whole file (labels, history, features, every check), which
   is what training preparation and batch reranking both do;

printing rows/s and lists/s of each and the peak resident memory (which should not
grow with the file: the reader holds one chunk of ``--chunk_rows`` rows).
"""

import os
import resource
import time

from absl import app, flags
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dnr_jax.data import own_lists

flags.DEFINE_integer("lists", 20_000, "Lists in the file.")
flags.DEFINE_integer("candidates", 50, "Rows per list.")
flags.DEFINE_integer("users", 5_000, "Distinct users.")
flags.DEFINE_integer("items", 50_000, "Distinct items.")
flags.DEFINE_integer("interactions_per_user", 40, "Interaction rows per user.")
flags.DEFINE_integer("list_size", 50, "n.")
flags.DEFINE_integer("history_size", 50, "H.")
flags.DEFINE_integer("chunk_rows", 1 << 16, "Rows per chunk.")
flags.DEFINE_string("workdir", "/tmp/own_lists_bench", "Where the files go.")
FLAGS = flags.FLAGS


def _peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def write_files(directory: str) -> tuple[str, str]:
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  lists_path = os.path.join(directory, "lists.parquet")
  writer = None
  per = 2000   # lists per row group
  for start in range(0, FLAGS.lists, per):
    n = min(per, FLAGS.lists - start)
    c = FLAGS.candidates
    users = rng.integers(0, FLAGS.users, n)
    items = np.stack([rng.choice(FLAGS.items, c, replace=False) for _ in range(n)])
    table = pa.table({
        "list_id": pa.array(np.repeat([f"req-{start + j:08d}" for j in range(n)], c)),
        "user_id": pa.array(np.repeat([f"user-{u}" for u in users], c)),
        "item_id": pa.array([f"item-{i}" for i in items.reshape(-1)]),
        "score": pa.array(rng.random(n * c).astype(np.float32)),
        "label": pa.array((rng.random(n * c) < 0.2).astype(np.int8)),
        "position": pa.array(np.tile(np.arange(c, dtype=np.int32), n)),
        "time": pa.array(np.repeat(1_700_000_000 + 10 * (start + np.arange(n)), c)),
        "u_a": pa.array(np.repeat(users % 7, c)),
        "u_b": pa.array(np.repeat([f"b{u % 13}" for u in users], c)),
        "i_a": pa.array(items.reshape(-1) % 100),
        "i_b": pa.array([f"c{i % 31}" for i in items.reshape(-1)]),
    })
    if writer is None:
      writer = pq.ParquetWriter(lists_path, table.schema)
    writer.write_table(table)
  writer.close()
  m = FLAGS.users * FLAGS.interactions_per_user
  inter_path = os.path.join(directory, "interactions.parquet")
  pq.write_table(pa.table({
      "user_id": pa.array([f"user-{u}" for u in rng.integers(0, FLAGS.users, m)]),
      "item_id": pa.array([f"item-{i}" for i in rng.integers(0, FLAGS.items, m)]),
      "time": pa.array(1_700_000_000 - 10_000 + rng.integers(0, 10 * FLAGS.lists
                                                                + 10_000, m))}),
      inter_path)
  return lists_path, inter_path


def main(argv):
  del argv
  t = time.time()
  lists_path, inter_path = write_files(FLAGS.workdir)
  rows = FLAGS.lists * FLAGS.candidates
  print(f"wrote {rows:,} rows ({os.path.getsize(lists_path) / 1e6:.0f} MB Parquet) in "
        f"{time.time() - t:.0f}s; peak RSS {_peak_gb():.2f} GB (random data, NOT real)")
  config = own_lists.OwnListsConfig(
      lists=lists_path, interactions=inter_path, list_size=FLAGS.list_size,
      history_size=FLAGS.history_size, chunk_rows=FLAGS.chunk_rows)
  t = time.time()
  vocab = own_lists.fit_vocabulary(config)
  dt = time.time() - t
  print(f"1. fit_vocabulary: {dt:.1f}s, {rows / dt:,.0f} list rows/s "
        f"({vocab.num_users - 1} users, {vocab.num_items - 1} items); peak RSS "
        f"{_peak_gb():.2f} GB")
  t = time.time()
  history = own_lists.InteractionHistory.load(inter_path, vocab, config)
  dt = time.time() - t
  print(f"2. InteractionHistory.load: {dt:.1f}s for {history.stats['interactions']:,} "
        f"rows; peak RSS {_peak_gb():.2f} GB")
  t, done, last = time.time(), 0, 0.0
  for chunk in own_lists.read_lists(lists_path, vocab=vocab, config=config,
                                    history=history, require_labels=True):
    done += len(chunk)
    if time.time() - last > 5:
      last = time.time()
      print(f"   read_lists: {done:,}/{FLAGS.lists:,} lists, "
            f"{done / (last - t):,.0f} lists/s")
  dt = time.time() - t
  print(f"3. read_lists: {dt:.1f}s, {rows / dt:,.0f} rows/s, {done / dt:,.0f} lists/s; "
        f"peak RSS {_peak_gb():.2f} GB")


if __name__ == "__main__":
  app.run(main)
