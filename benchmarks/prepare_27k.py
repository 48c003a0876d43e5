r"""Benchmark: preparing a KuaiRand-27K-schema log streams in bounded memory.

  python -m benchmarks.prepare_27k --rows=10000000 --workdir=/tmp/bench27k

Generates a KuaiRand-27K-schema data set (the real file names and columns: two periods
of two ``_part`` files each, the random log, user and video features) of ``--rows``
log rows, then prepares it with the real ``kuairand/27k`` builder: every line is
parsed, validated and written into the TFDS data set. Prints rows/s, the projected
time for the real 27K (322,278,385 rows) and the peak resident memory. Then, with
``--load`` (default on), reads the log back into the in-memory ``Interactions`` the
list stage starts from and applies the 20-core, and prints that stage's time and peak
memory too. The data is generated, NOT the real KuaiRand.
"""

import os
import resource
import shutil
import time

from absl import app, flags, logging

flags.DEFINE_integer("rows", 10_000_000, "Standard-log rows to generate (about).")
flags.DEFINE_integer("users", 27_285, "Users (the real 27K has 27,285).")
flags.DEFINE_integer("items", 500_000, "Videos.")
flags.DEFINE_string("workdir", "/tmp/dnr_bench_27k", "Scratch directory (removed "
                    "first).")
flags.DEFINE_bool("load", True, "Also load the prepared log and apply the k-core.")
flags.DEFINE_integer("chunk_mb", 64, "CSV chunk size of the streaming reader.")
FLAGS = flags.FLAGS

REAL_27K_ROWS = 322_278_385


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KB on Linux


def main(argv):
  del argv
  from dnr_jax.data import kuairand, preprocess, raw, samples  # pylint: disable=g-import-not-at-top
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
  if FLAGS.load:
    t0 = time.time()
    log = kuairand.to_interactions(builder)
    log = preprocess.k_core(log, 20)
    print(f"loaded + 20-core: {log.num_rows:,} rows, {log.num_users - 1:,} users, "
          f"{log.num_items - 1:,} videos in {time.time() - t0:.0f}s; peak RSS "
          f"{_peak_rss_gb():.2f} GB", flush=True)


if __name__ == "__main__":
  app.run(main)
