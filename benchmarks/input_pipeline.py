r"""Benchmark: is the input pipeline ever the bottleneck of a DNR train step?

  python -m benchmarks.input_pipeline
  python -m benchmarks.input_pipeline --lists=1000000 --step_batch=2048   # accelerator

Builds one split of paper-sized lists in host memory (``--lists`` lists of n = 50
candidates, a history of H = 50 items, 26 user and 5 per-candidate item features, as
KuaiRand lists have; KuaiRand-Pure vocabulary sizes). The contents are random ids and
scores: this measures the host pipeline and the step's speed, not learning. Then it
prints, on the default JAX backend:

1. the host pipeline: ``pipeline.batches`` (shuffle, batch 2048) over one epoch;
2. the same through ``pipeline.prefetch(..., transform=runner.put_batch)``, the
   training loop's feed, device placement included;
3. the real DNR train step (DNR-G, phase ``"model"``, PRM, hidden 128) at
   ``--step_batch`` lists (2048, the paper's batch, on accelerators; smaller on CPU,
   where a 2048 step is slow), timed over a few steps after a compile step;

then the ratio pipeline / step with a verdict, the rate the paper's DNR epoch time on
ML-1M implies, and the peak resident memory.
"""

import itertools
import resource
import time

from absl import app, flags
import jax
import numpy as np

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax.runtime import pipeline
from dnr_jax import step as step_lib
from dnr_jax.runtime import runner as runner_lib

flags.DEFINE_integer("lists", 200_000, "Lists in the split.")
flags.DEFINE_integer("list_size", 50, "Candidates per list (n).")
flags.DEFINE_integer("history_size", 50, "History length (H).")
flags.DEFINE_integer("user_features", 26, "Categorical user features per list.")
flags.DEFINE_integer("item_features", 5, "Categorical item features per candidate.")
flags.DEFINE_integer("feature_vocab", 50, "Vocabulary size of every feature.")
flags.DEFINE_integer("users", 27_285, "User vocabulary (KuaiRand-Pure: 27,285).")
flags.DEFINE_integer("items", 7_583, "Item vocabulary (KuaiRand-Pure: 7,583).")
flags.DEFINE_integer("batch_size", 2048, "Global batch of the pipeline measurements.")
flags.DEFINE_integer("prefetch", 2, "Batches placed ahead by pipeline.prefetch.")
flags.DEFINE_integer("step_batch", 0, "Global batch of the train step measurement; "
                     "0: 2048 (the paper's) on accelerators, 256 on CPU.")
flags.DEFINE_integer("steps", 3, "Timed train steps (after one compile step).")
flags.DEFINE_integer("hidden", 128, "Reranker hidden size (the paper's 128).")
flags.DEFINE_enum("compile", config_lib.TrainConfig.compile, config_lib.COMPILERS,
                  "Step compilation.")
FLAGS = flags.FLAGS

# ML-1M: 161,646 training lists, and the paper reports 1m06s per DNR epoch.
PAPER_LISTS, PAPER_EPOCH_S = 161_646, 66.0


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KB on Linux


def make_split(num: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random lists with the real layout: ids from 1, padding (0, mask False) at the end."""
  rng = np.random.default_rng(seed)
  n, h = FLAGS.list_size, FLAGS.history_size
  # KuaiRand exposure lists are runs of 10 to n impressions; histories vary too.
  mask = np.arange(n) < rng.integers(min(10, n), n + 1, num)[:, None]
  history_mask = np.arange(h) < rng.integers(0, h + 1, num)[:, None]
  items = rng.integers(1, FLAGS.items, (num, n), dtype=np.int32) * mask
  scores = np.sort(rng.random((num, n), dtype=np.float32), axis=1)[:, ::-1] * mask
  return pipeline.complete({
      "user": rng.integers(1, FLAGS.users, num, dtype=np.int32),
      "history": rng.integers(1, FLAGS.items, (num, h), dtype=np.int32) * history_mask,
      "history_mask": history_mask,
      "items": items,
      "scores": scores,
      "labels": (rng.random((num, n), dtype=np.float32) < 0.2) * mask,
      "mask": mask,
      "user_features": rng.integers(1, FLAGS.feature_vocab,
                                    (num, FLAGS.user_features), dtype=np.int32),
      "item_features": rng.integers(1, FLAGS.feature_vocab,
                                    (num, n, FLAGS.item_features), dtype=np.int32)})


def make_config(batch_size: int) -> config_lib.TrainConfig:
  model = config_lib.ModelConfig(
      backbone="prm", hidden=FLAGS.hidden, num_items=FLAGS.items, num_users=FLAGS.users,
      user_feature_vocab=(FLAGS.feature_vocab,) * FLAGS.user_features,
      item_feature_vocab=(FLAGS.feature_vocab,) * FLAGS.item_features)
  return config_lib.apply_method(config_lib.TrainConfig(
      model=model, global_batch_size=batch_size, warmup_epochs=0,
      compile=FLAGS.compile), "dnr_g")


def time_epoch(batches) -> tuple[float, int]:
  """Seconds and lists for consuming ``batches``, every batch ready on arrival."""
  t0, lists = time.perf_counter(), 0
  for b in batches:
    jax.block_until_ready(b)   # a no-op on host arrays; waits for device copies
    lists += (b.items if isinstance(b, batch_lib.ListBatch) else b["items"]).size \
        // FLAGS.list_size
  return time.perf_counter() - t0, lists


def main(argv):
  del argv
  backend = jax.default_backend()
  step_batch = FLAGS.step_batch or (256 if backend == "cpu" else 2048)
  t0 = time.perf_counter()
  split = make_split(FLAGS.lists)
  nbytes = sum(v.nbytes for v in split.values())
  print(f"split: {FLAGS.lists:,} random lists (n={FLAGS.list_size}, "
        f"H={FLAGS.history_size}, {FLAGS.user_features} user / {FLAGS.item_features} "
        f"item features), {nbytes / 1e9:.2f} GB, built in "
        f"{time.perf_counter() - t0:.1f}s (peak RSS so far {_peak_rss_gb():.2f} GB); "
        f"NOT real data, for speed only", flush=True)
  print(f"backend: {backend}, {jax.local_device_count()} device(s), "
        f"compile={FLAGS.compile}", flush=True)

  def epoch(seed_epoch):
    return pipeline.batches(split, FLAGS.batch_size, shuffle=True, epoch=seed_epoch,
                            pad_last=False)

  secs, lists = time_epoch(epoch(0))
  host_rate = lists / secs
  print(f"(i)   host pipeline, batch {FLAGS.batch_size}: {lists:,} lists in "
        f"{secs:.2f}s = {host_rate:,.0f} lists/s", flush=True)

  config = make_config(step_batch)
  runner = runner_lib.Runner(config)
  config_lib.validate(config, list_size=FLAGS.list_size,
                      num_devices=runner.num_devices)
  secs, lists = time_epoch(pipeline.prefetch(epoch(1), size=FLAGS.prefetch,
                                             transform=runner.put_batch))
  fed_rate = lists / secs
  print(f"(ii)  prefetch({FLAGS.prefetch}) + put_batch on {backend}: {lists:,} lists in "
        f"{secs:.2f}s = {fed_rate:,.0f} lists/s (peak RSS so far {_peak_rss_gb():.2f} GB)",
        flush=True)

  # The real step, fed with batches placed beforehand so only the step is timed.
  per_device = step_batch // runner.num_devices
  example = batch_lib.ListBatch.from_arrays({k: v[:per_device] for k, v in split.items()})
  state = runner.put_state(step_lib.create_state(config, example, jax.random.PRNGKey(0)))
  placed = [runner.put_batch(b) for b in itertools.islice(
      pipeline.batches(split, step_batch, shuffle=True, epoch=2, pad_last=False),
      FLAGS.steps + 1)]
  t0 = time.perf_counter()
  state, metrics = runner.train(state, placed[0], "model")
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in placed[1:]:
    state, metrics = runner.train(state, b, "model")
  jax.block_until_ready((state, metrics))
  secs = time.perf_counter() - t0
  step_rate = FLAGS.steps * step_batch / secs
  print(f"(iii) DNR-G train step (phase model, PRM, hidden {FLAGS.hidden}), batch "
        f"{step_batch}: {FLAGS.steps} steps in {secs:.2f}s = {step_rate:,.0f} lists/s "
        f"({secs / FLAGS.steps:.2f} s/step; first step with compilation "
        f"{compile_s:.1f}s; l_theta={float(metrics['l_theta']):.4f})", flush=True)

  pipe_rate = min(host_rate, fed_rate)
  ratio = pipe_rate / step_rate
  print(f"pipeline / step = {pipe_rate:,.0f} / {step_rate:,.0f} = {ratio:,.1f}x", flush=True)
  if ratio > 1:
    print(f"verdict: the input pipeline is {ratio:,.1f}x faster than the train step on "
          f"{backend}: not the bottleneck", flush=True)
  else:
    print(f"verdict: the input pipeline is SLOWER than the train step on {backend} "
          f"({ratio:.2f}x): it is the bottleneck", flush=True)
  paper_rate = PAPER_LISTS / PAPER_EPOCH_S
  print(f"reference: the paper's DNR epoch on ML-1M ({PAPER_LISTS:,} lists in "
        f"{PAPER_EPOCH_S:.0f}s) implies {paper_rate:,.0f} lists/s; the pipeline runs "
        f"at {pipe_rate / paper_rate:,.0f}x that", flush=True)
  print(f"peak RSS: {_peak_rss_gb():.2f} GB", flush=True)


if __name__ == "__main__":
  app.run(main)
