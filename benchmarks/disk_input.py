r"""Benchmark: training from disk (``--input=disk``) at 1M and 10M lists.

  python -m benchmarks.disk_input                          # 1M and 10M lists
  python -m benchmarks.disk_input --lists=1000000 --workdir=/tmp/dnr_disk_input

For each ``--lists`` size, in a fresh process (so each peak RSS is its own):

1. writes that many generated lists (random ids, scores and labels in the own-lists
   example's shapes: n = 20, H = 20, 2 user and 1 item feature; NOT real data)
   straight to a list-records file (``data.list_records``), 100,000 lists at a time;
2. the feed: ``runtime.disk_input.batches`` over ``--feed_batches`` batches of
   ``--batch_size`` (random access, Grain threads): lists/s;
3. the step: the c-score train step (PRM, hidden 32, as ``lists_example.flags``) on
   one placed batch, repeated: lists/s;
4. training from disk: ``--train_steps`` steps fed by the disk input through
   ``pipeline.prefetch`` and ``Runner.put_batch``, as ``train.py`` feeds them: lists/s;

and prints one JSON line per size with the peak RSS of that process. The lists are
written in the record layout directly: preparing 10M lists through an own-lists
Parquet file and its reader would take the 2-core build machine about half an hour
(the reader's measured 6,000 lists/s), and the conversion from the prepared lists is
the same writer (``prepare.disk_split``).
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


def _config(batch_size: int):
  from dnr_jax import config as config_lib
  model = config_lib.ModelConfig(
      hidden=32, num_heads=2, dropout=0.3, num_items=ITEMS, num_users=USERS,
      user_feature_vocab=(VOCAB,) * USER_FEATURES,
      item_feature_vocab=(VOCAB,) * ITEM_FEATURES)
  return config_lib.apply_method(config_lib.TrainConfig(
      model=model, global_batch_size=batch_size, eval_batch_size=batch_size),
                                 "c_score")


def measure(total: int, workdir: str, batch_size: int, feed_batches: int,
            train_steps: int, threads: int) -> dict:
  """Steps 1-4 of the module docstring for one file size; runs in its own process."""
  import itertools
  import jax
  from dnr_jax import batch as batch_lib
  from dnr_jax import errors
  from dnr_jax import step as step_lib
  from dnr_jax.data import list_records
  from dnr_jax.runtime import disk_input, pipeline
  from dnr_jax.runtime import runner as runner_lib
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, f"lists_{total}.list_records")
  rec = {"bench": "disk_input", "lists": total, "batch_size": batch_size,
         "list_size": N, "history_size": H, "threads": threads,
         "platform": jax.devices()[0].platform}
  try:
    reuse = len(list_records.ListRecords(path)) == total
  except errors.DataError:   # missing, or damaged by a killed run
    reuse = False
  if not reuse:
    t0 = time.perf_counter()
    list_records.write_list_records(path, _chunks(total))
    rec["write_lists_per_s"] = total / (time.perf_counter() - t0)
  records = list_records.ListRecords(path)
  rec["file_gb"] = os.path.getsize(path) / 1e9
  rec["rss_after_write_gb"] = _peak_rss_gb()

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

  config = _config(batch_size)
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


def _child(args, out) -> None:
  out.put(measure(*args))


def main(argv):
  del argv
  import multiprocessing
  ctx = multiprocessing.get_context("spawn")
  for total in (int(v) for v in FLAGS.lists):
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=((total, FLAGS.workdir, FLAGS.batch_size,
                                             FLAGS.feed_batches, FLAGS.train_steps,
                                             FLAGS.threads), out))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
      raise SystemExit(f"the {total:,}-list measurement failed (exit {proc.exitcode})")
    print(json.dumps(out.get(timeout=10)), flush=True)


if __name__ == "__main__":
  app.run(main)
