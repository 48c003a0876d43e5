r"""Benchmark: preparing a KuaiRand-27K-schema log streams in bounded memory.

  python -m benchmarks.prepare_27k --rows=10000000 --workdir=/tmp/bench27k

Generates a KuaiRand-27K-schema data set (the real file names and columns: two periods
of two ``_part`` files each, the random log, user and video features) of ``--rows``
log rows, then runs the real preparation on it, stage by stage, printing each stage's
time, rows/s, the projection for the real 27K (322,278,385 rows) and the peak resident
memory so far:

1. the raw ``kuairand/27k`` TFDS builder: every CSV line parsed, validated and written;
2. the streamed passes (``dnr_jax.data.stream``): the 20-core, the time cuts, the
   partition of the surviving rows into user shards of ``--shard_rows`` rows;
3. the MF retriever on the positives before the cut (``--retriever_epochs``; the paper
   trains to convergence: scale its time by the epochs you use);
4. the exposure lists, shard by shard.

The data is generated, NOT the real KuaiRand.
"""

import os
import resource
import shutil
import time

from absl import app, flags, logging

from dnr_jax.data import lists, prepare
from dnr_jax.data import retriever as retriever_lib

flags.DEFINE_integer("rows", 10_000_000, "Standard-log rows to generate (about).")
flags.DEFINE_integer("users", 27_285, "Users (the real 27K has 27,285).")
flags.DEFINE_integer("items", 500_000, "Videos.")
flags.DEFINE_string("workdir", "/tmp/dnr_bench_27k", "Scratch directory (removed "
                    "first).")
flags.DEFINE_bool("lists", True, "Also run stages 2-4 (k-core, retriever, lists).")
flags.DEFINE_integer("chunk_mb", 64, "CSV chunk size of the streaming reader.")
flags.DEFINE_integer("shard_rows", prepare.DataConfig.shard_rows,
                     "Rows of a user shard in memory (the library's default).")
flags.DEFINE_integer("retriever_epochs", 1, "MF epochs (the time scales with them).")
flags.DEFINE_integer("retriever_dim", 128, "MF embedding size (paper: 128).")
FLAGS = flags.FLAGS

REAL_27K_ROWS = 322_278_385


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KB on Linux


def main(argv):
  del argv
  from dnr_jax.data import kuairand, raw, samples  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.INFO)
  shutil.rmtree(FLAGS.workdir, ignore_errors=True)
  source = os.path.join(FLAGS.workdir, "source")
  t0 = time.time()
  data = samples.write_kuairand(source, samples.SampleConfig(
      num_users=FLAGS.users, num_items=FLAGS.items,
      rows_per_user=max(1, FLAGS.rows // FLAGS.users), random_rows_per_user=2),
      variant="27k")
  size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
  gen_s = time.time() - t0
  print(f"generated {size / 1e9:.2f} GB of 27K-schema CSV in {gen_s:.0f}s "
        f"(peak RSS so far {_peak_rss_gb():.2f} GB)", flush=True)

  builder = kuairand.Kuairand(config="27k", data_dir=os.path.join(FLAGS.workdir, "tfds"),
                              source_dir=source, chunk_bytes=FLAGS.chunk_mb << 20)
  t0 = time.time()
  raw.prepare(builder)
  prep_s = time.time() - t0
  rows = builder.info.metadata["log_rows"]
  speed = rows / prep_s
  print(f"prepared {rows:,} log rows ({size / 1e9:.2f} GB CSV) in {prep_s:.0f}s: "
        f"{speed:,.0f} rows/s, {size / 1e6 / prep_s:.0f} MB/s", flush=True)
  print(f"projected for the real KuaiRand-27K ({REAL_27K_ROWS:,} rows): "
        f"{REAL_27K_ROWS / speed / 60:.0f} min", flush=True)
  print(f"peak RSS after preparation: {_peak_rss_gb():.2f} GB", flush=True)
  if not FLAGS.lists:
    return
  config = prepare.DataConfig(
      dataset="kuairand", variant="27k", source_dir=source,
      data_dir=os.path.join(FLAGS.workdir, "tfds"), shard_rows=FLAGS.shard_rows,
      retriever=retriever_lib.RetrieverConfig(dim=FLAGS.retriever_dim,
                                              epochs=FLAGS.retriever_epochs),
      lists=lists.ListConfig(protocol="exposure"))
  spill = os.path.join(FLAGS.workdir, "spill")
  os.makedirs(spill, exist_ok=True)
  built = prepare.build(config, spill)
  r = built.meta["report"]
  sec = r["stage_seconds"]
  passes = sec["k_core"] + sec["partition"]
  print(f"streamed passes (20-core, time cuts, partition into {r['shards']} user shards "
        f"of ~{FLAGS.shard_rows:,} rows): {passes:.0f}s, {rows / passes:,.0f} rows/s; "
        f"{r['rows']:,} rows survive", flush=True)
  print(f"retriever: {r['retriever']['train_pairs']:,} positives, "
        f"{FLAGS.retriever_epochs} epoch(s) in {sec['retriever']:.0f}s, held-out AUC "
        f"{r['retriever']['heldout_auc']:.3f}", flush=True)
  n_lists = sum(r[s]["lists"] for s in lists.SPLITS)
  print(f"lists: {n_lists:,} exposure lists in {sec['lists']:.0f}s "
        f"({r['rows'] / sec['lists']:,.0f} rows/s)", flush=True)
  streamed = passes + sec["lists"]
  print(f"stages 2 and 4 (everything but the retriever): {rows / streamed:,.0f} rows/s; "
        f"projected for the real 27K: {REAL_27K_ROWS / (rows / streamed) / 60:.0f} min",
        flush=True)
  print(f"peak RSS of the whole run: {_peak_rss_gb():.2f} GB", flush=True)


if __name__ == "__main__":
  app.run(main)
