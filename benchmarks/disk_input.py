r"""Benchmark: training from disk (``--input=disk``) at 1M and 10M lists.

  python -m benchmarks.disk_input                          # 1M and 10M lists
  python -m benchmarks.disk_input --lists=1000000 --workdir=/tmp/dnr_disk_input
  python -m benchmarks.disk_input --source=own_lists --lists=1000000   # prepared

For each ``--lists`` size, in fresh processes (so each peak RSS is its own):

0. ``--source=own_lists``: writes a generated own-lists Parquet file of that
   many lists (``--candidates`` rows each: integer list, user and item ids, a score,
   a label, a time, a user and an item feature; no history; NOT real data) and
   prepares it as ``experiments.lists --input=disk`` does (``prepare_own_lists`` with
   the training split written as list records; 0.1% of the lists each for
   validation and test, which stay in memory), reporting the preparation's time and
   peak RSS. Preparation goes through TFDS's writer, which keeps a split's first
   1 GB in memory and spills the rest through TensorFlow's file API: a training
   split of more than 1 GB serialized (about 4M lists at n = 8, H = 20) needs the
   ``large`` extra;
1. ``--source=records`` (default): writes that many generated lists (random ids, scores and
   labels; n = 20, H = 20, 2 user and 1 item feature; NOT real data) straight to a
   list-records file (``data.list_records``), 100,000 lists at a time;
2. the feed: ``runtime.disk_input.batches`` over ``--feed_batches`` batches of
   ``--batch_size`` (random access, Grain threads): lists/s;
3. the step: the c-score train step (PRM, hidden 32, as ``lists_example.flags``) on
   one placed batch, repeated: lists/s;
4. training from disk: ``--train_steps`` steps fed by the disk input through
   ``pipeline.prefetch`` and ``Runner.put_batch``, as ``train.py`` feeds them: lists/s;

and prints one JSON line per size with the peak RSS of the training process.
"""

from __future__ import annotations

import json
import os
import resource
import time

from absl import app, flags

flags.DEFINE_list("lists", ["1000000", "10000000"], "Sizes of the generated files.")
flags.DEFINE_string("workdir", "/tmp/dnr_disk_input", "Where the files go (kept and "
                    "reused when their size matches).")
flags.DEFINE_integer("batch_size", 256, "Global batch of the feed and the steps.")
flags.DEFINE_integer("feed_batches", 400, "Batches read in the feed measurement.")
flags.DEFINE_integer("train_steps", 60, "Steps of the training-from-disk measurement.")
flags.DEFINE_integer("threads", 4, "Grain reader threads.")
flags.DEFINE_enum("source", "records", ["records", "own_lists"],
                  "own_lists: an own-lists file, prepared; records: list records "
                  "written directly.")
flags.DEFINE_integer("candidates", 8, "own_lists: candidates per list (n).")
FLAGS = flags.FLAGS

N, H, USER_FEATURES, ITEM_FEATURES = 20, 20, 2, 1
# Vocabularies small enough that the model is a small part of the RSS.
USERS, ITEMS, VOCAB = 10_000, 50_000, 50
CHUNK = 100_000


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KB on Linux


def _chunks(total: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  for start in range(0, total, CHUNK):
    b = min(CHUNK, total - start)
    mask = np.arange(N) < rng.integers(6, N + 1, b)[:, None]
    history_mask = np.arange(H) < rng.integers(1, H + 1, b)[:, None]
    # Right-aligned histories: padding first.
    history_mask = history_mask[:, ::-1]
    labels = (rng.random((b, N)) < 0.2) & mask
    labels[:, 0] = True
    yield {
        "user": rng.integers(1, USERS, b, dtype=np.int32),
        "history": rng.integers(1, ITEMS, (b, H), dtype=np.int32) * history_mask,
        "history_mask": np.ascontiguousarray(history_mask),
        "items": rng.integers(1, ITEMS, (b, N), dtype=np.int32) * mask,
        "scores": (np.sort(rng.random((b, N), dtype=np.float32), 1)[:, ::-1] * mask),
        "labels": labels.astype(np.float32), "mask": mask,
        "user_features": rng.integers(1, VOCAB, (b, USER_FEATURES), dtype=np.int32),
        "item_features": rng.integers(1, VOCAB, (b, N, ITEM_FEATURES),
                                      dtype=np.int32) * mask[..., None],
    }


def _write_own_lists(path: str, total: int, candidates: int, seed: int = 0) -> None:
  """A generated own-lists Parquet file of ``total`` lists (integer ids)."""
  import numpy as np
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(seed)
  c, writer = candidates, None
  # Distinct items within a list: a random start plus multiples of a prime stride.
  stride = np.arange(c, dtype=np.int64) * 7919
  for start in range(0, total, CHUNK):
    b = min(CHUNK, total - start)
    users = rng.integers(1, USERS, b)
    items = (rng.integers(0, ITEMS, b)[:, None] + stride) % ITEMS + 1
    table = pa.table({
        "list_id": np.repeat(np.arange(start, start + b, dtype=np.int64), c),
        "user_id": np.repeat(users, c),
        "item_id": items.reshape(-1),
        "score": rng.random(b * c, dtype=np.float32),
        "label": (rng.random(b * c) < 0.2).astype(np.int8),
        "time": np.repeat(1_700_000_000 + np.arange(start, start + b), c),
        "u_a": np.repeat(users % 7, c),
        "i_a": items.reshape(-1) % 50,
    })
    if writer is None:
      writer = pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
  writer.close()


def _own_lists_config(workdir: str, total: int, candidates: int):
  from dnr_jax.data import own_lists
  return own_lists.OwnListsConfig(
      lists=os.path.join(workdir, f"own_lists_{total}.parquet"), list_size=candidates,
      history_size=H, valid_fraction=0.001, test_fraction=0.001,
      data_dir=os.path.join(workdir, "prepared"))


def prepare(total: int, workdir: str, candidates: int) -> dict:
  """Step 0: the own-lists file, prepared with its training split on disk."""
  from dnr_jax.data import own_lists
  os.makedirs(workdir, exist_ok=True)
  config = _own_lists_config(workdir, total, candidates)
  rec = {"lists": total, "candidates": candidates}
  if not os.path.exists(config.lists):
    t0 = time.perf_counter()
    _write_own_lists(config.lists, total, candidates)
    rec["write_parquet_s"] = time.perf_counter() - t0
  rec["parquet_gb"] = os.path.getsize(config.lists) / 1e9
  t0 = time.perf_counter()
  data = own_lists.prepare_own_lists(config, on_disk=("train",))
  rec["prepare_s"] = time.perf_counter() - t0
  rec["train_lists"] = len(data.splits["train"])
  rec["prepare_peak_rss_gb"] = _peak_rss_gb()
  return rec


def _config(batch_size: int, data=None):
  from dnr_jax import config as config_lib
  model = config_lib.ModelConfig(
      hidden=32, num_heads=2, dropout=0.3,
      num_items=data.num_items if data else ITEMS,
      num_users=data.num_users if data else USERS,
      user_feature_vocab=(tuple(data.user_feature_vocab) if data
                          else (VOCAB,) * USER_FEATURES),
      item_feature_vocab=(tuple(data.item_feature_vocab) if data
                          else (VOCAB,) * ITEM_FEATURES))
  return config_lib.apply_method(config_lib.TrainConfig(
      model=model, global_batch_size=batch_size, eval_batch_size=batch_size),
                                 "c_score")


def measure(total: int, workdir: str, batch_size: int, feed_batches: int,
            train_steps: int, threads: int, source: str = "records",
            candidates: int = 8) -> dict:
  """Steps 1-4 of the module docstring for one file size; runs in its own process
  (``source="own_lists"``: after ``prepare``, on the prepared training split)."""
  import itertools
  import jax
  from dnr_jax import batch as batch_lib
  from dnr_jax import errors
  from dnr_jax import step as step_lib
  from dnr_jax.data import list_records
  from dnr_jax.runtime import disk_input, pipeline
  from dnr_jax.runtime import runner as runner_lib
  os.makedirs(workdir, exist_ok=True)
  rec = {"bench": "disk_input", "source": source, "lists": total,
         "batch_size": batch_size, "history_size": H, "threads": threads,
         "platform": jax.devices()[0].platform}
  data = None
  if source == "own_lists":
    from dnr_jax.data import own_lists  # pylint: disable=g-import-not-at-top
    data = own_lists.prepare_own_lists(_own_lists_config(workdir, total, candidates),
                                       on_disk=("train",))
    records = data.splits["train"]
    path = records.path
  else:
    path = os.path.join(workdir, f"lists_{total}.list_records")
    try:
      reuse = len(list_records.ListRecords(path)) == total
    except errors.DataError:   # missing, or damaged by a killed run
      reuse = False
    if not reuse:
      t0 = time.perf_counter()
      list_records.write_list_records(path, _chunks(total))
      rec["write_lists_per_s"] = total / (time.perf_counter() - t0)
    records = list_records.ListRecords(path)
  rec["list_size"] = records.shapes["items"][0]
  rec["train_lists"] = len(records)
  rec["file_gb"] = os.path.getsize(path) / 1e9
  rec["rss_before_feed_gb"] = _peak_rss_gb()

  def feed():
    return disk_input.batches(records, batch_size, seed=0, epoch=0,
                              num_threads=threads)
  it = feed()
  next(it)                                  # the epoch's order drawn, threads started
  t0 = time.perf_counter()
  for _ in itertools.islice(it, feed_batches):
    pass
  rec["feed_lists_per_s"] = feed_batches * batch_size / (time.perf_counter() - t0)
  it.close()

  config = _config(batch_size, data)
  runner = runner_lib.Runner(config, tuple(jax.devices()[:1]))
  example = batch_lib.ListBatch.from_arrays(records.read(range(batch_size)))
  state = runner.put_state(step_lib.create_state(config, example,
                                                 jax.random.PRNGKey(0)))
  placed = runner.put_batch(records.read(range(batch_size)))
  state, m = runner.train(state, placed, "direct")
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(20):
    state, m = runner.train(state, placed, "direct")
  jax.block_until_ready(m)
  rec["step_lists_per_s"] = 20 * batch_size / (time.perf_counter() - t0)

  source = disk_input.batches(records, batch_size, seed=0, epoch=1,
                              num_threads=threads)
  batches = pipeline.prefetch(source, size=2, transform=runner.put_batch)
  t0 = time.perf_counter()
  for b in itertools.islice(batches, train_steps):
    state, m = runner.train(state, b, "direct")
  jax.block_until_ready(m)
  batches.close()
  rec["train_from_disk_lists_per_s"] = train_steps * batch_size / (
      time.perf_counter() - t0)
  rec["feed_over_step"] = rec["feed_lists_per_s"] / rec["step_lists_per_s"]
  rec["peak_rss_gb"] = _peak_rss_gb()
  return rec


def _child(fn, args, out) -> None:
  out.put(fn(*args))


def _in_child(fn, args) -> dict:
  import multiprocessing
  ctx = multiprocessing.get_context("spawn")
  out = ctx.Queue()
  proc = ctx.Process(target=_child, args=(fn, args, out))
  proc.start()
  proc.join()
  if proc.exitcode != 0:
    raise SystemExit(f"{fn.__name__}{args[:1]} failed (exit {proc.exitcode})")
  return out.get(timeout=10)


def main(argv):
  del argv
  for total in (int(v) for v in FLAGS.lists):
    rec = {}
    if FLAGS.source == "own_lists":
      rec = _in_child(prepare, (total, FLAGS.workdir, FLAGS.candidates))
    rec.update(_in_child(measure, (total, FLAGS.workdir, FLAGS.batch_size,
                                   FLAGS.feed_batches, FLAGS.train_steps, FLAGS.threads,
                                   FLAGS.source, FLAGS.candidates)))
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  app.run(main)
