r"""One-shot accelerator check: step speed, bf16, vs PyTorch, an ML-1M-sized epoch.

On a GPU machine, from the repository root (no install needed; about 4-5 minutes):

  PYTHONPATH=. timeout 360 python -m benchmarks.gpu_check

and on CPU, tiny shapes, to check that it runs (the test suite does this):

  PYTHONPATH=. python -m benchmarks.gpu_check --quick

Prints one JSON object per line, and appends them to ``$OUT/gpu.jsonl`` when ``$OUT``
is set. Sections, in this order (each in its own ``try``: a failing section prints a
``{"bench": ..., "error": ...}`` line and the next one runs; once ``--budget_s`` is
spent the remaining sections print ``"skipped"`` lines instead of running):

1. ``step``: ``benchmarks.step`` at the paper's shapes (n = 50, H = 50, hidden 128,
   batch 2048): the direct (c score), heuristic and model (DNR-G) train steps and the
   eval step, fp32;
2. ``ml1m_epoch``: one DNR epoch (phase ``model``, PRM hidden 128, batch 2048) over
   161,646 random lists shaped like ML-1M's (6,040 users, 3,706 items, n = 50,
   H = 50, 3 user features and 1 item feature with ML-1M's vocabularies), timed end to
   end with the real input pipeline (``pipeline.batches`` + ``pipeline.prefetch`` +
   ``Runner.put_batch``) and again with one batch already on the device; the target
   is an epoch under 5 s and the pipeline never the bottleneck;
3. ``vs_torch``: dnr-jax vs the PyTorch eager reference (``benchmarks/torch_prm.py``)
   at the comparison's shapes (batch 256, n = 50, H = 50, hidden 128, 2 heads, 1 history
   and 2 list layers), interleaved, on the same GPU;
4. ``step`` again in bf16 (``ModelConfig.compute_dtype="bfloat16"``).

Imports neither TensorFlow Datasets nor tensorboardX (the GPU machine has neither).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback

from absl import app, flags

from benchmarks import step as bench

flags.DEFINE_bool("quick", False, "Tiny shapes and few steps (a CPU smoke run).")
flags.DEFINE_float("budget_s", 300.0, "Seconds after which remaining sections are "
                   "skipped (the lead's limit is ~6 minutes in all).")
flags.DEFINE_integer("epoch_lists", 161_646, "Lists of the ML-1M-sized epoch.")
FLAGS = flags.FLAGS

# ML-1M: 6,040 users and 3,706 movies (+ the padding id 0); user gender (2), age (7),
# occupation (21) and one genre per movie (18 + unknown), each + 1 for padding.
ML1M = dict(users=6_041, items=3_707, user_feature_vocab=(3, 8, 22),
            item_feature_vocab=(20,))


def _set_step_flags(**values) -> None:
  for name, value in values.items():
    FLAGS[name].value = value


def section_steps(out, dtype: str) -> None:
  import jax
  quick = FLAGS.quick
  _set_step_flags(
      batch_size=32 if quick else 2048, list_size=8 if quick else 50,
      history_size=6 if quick else 50, hidden=16 if quick else 128, num_heads=4,
      num_layers=1, history_layers=1, steps=list(bench.STEPS),
      devices=["1"], warmup=1 if quick else 3, repeats=2 if quick else 5,
      iters=1 if quick else 10, users=ML1M["users"], items=ML1M["items"])
  lists = bench.lists_from_flags(4 * FLAGS.batch_size)
  for step in bench.STEPS:
    bench.measure(step, jax.local_devices()[:1], FLAGS.batch_size, lists, out,
                  extra={"section": f"step_{dtype}"}, dtypes=(dtype,))


def section_vs_torch(out) -> None:
  import jax
  quick = FLAGS.quick
  _set_step_flags(
      batch_size=16 if quick else 256, list_size=8 if quick else 50,
      history_size=6 if quick else 50, hidden=16 if quick else 128, num_heads=2,
      num_layers=2, history_layers=1, warmup=1 if quick else 3,
      repeats=2 if quick else 5, iters=1 if quick else 10, users=ML1M["users"],
      items=ML1M["items"])
  lists = bench.lists_from_flags(4 * FLAGS.batch_size)
  bench.compare_torch(jax.local_devices()[:1], lists, out)


def section_epoch(out) -> None:
  """An ML-1M-sized DNR epoch: real pipeline vs a batch already on the device."""
  import jax
  from dnr_jax import batch as batch_lib
  from dnr_jax.runtime import pipeline
  from dnr_jax import step as step_lib
  from dnr_jax.runtime import runner as runner_lib
  quick = FLAGS.quick
  num = 2_000 if quick else FLAGS.epoch_lists
  batch_size = 64 if quick else 2048
  shapes = dict(list_size=8 if quick else 50, history_size=6 if quick else 50)
  t0 = time.perf_counter()
  split = pipeline.complete(bench.random_lists(num, **shapes, **ML1M))
  build_s = time.perf_counter() - t0
  config = bench.make_config(method="dnr_g", batch_size=batch_size,
                             hidden=16 if quick else 128, users=ML1M["users"],
                             items=ML1M["items"],
                             user_feature_vocab=ML1M["user_feature_vocab"],
                             item_feature_vocab=ML1M["item_feature_vocab"])
  runner = runner_lib.Runner(config)
  per_device = batch_size // runner.num_devices
  example = batch_lib.ListBatch.from_arrays({k: v[:per_device] for k, v in split.items()})
  state = runner.put_state(step_lib.create_state(config, example, jax.random.PRNGKey(0)))

  def epoch_batches(epoch):
    return pipeline.batches(split, batch_size, shuffle=True, epoch=epoch, pad_last=False)

  first = runner.put_batch(next(iter(epoch_batches(0))))
  t0 = time.perf_counter()
  state, metrics = runner.train(state, first, "model")
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0

  def timed_epoch(epoch, on_device: bool):
    nonlocal state, metrics
    steps = 0
    t0 = time.perf_counter()
    if on_device:
      for _ in range(num // batch_size):
        state, metrics = runner.train(state, first, "model")
        steps += 1
    else:
      for b in pipeline.prefetch(epoch_batches(epoch), size=2,
                                 transform=runner.put_batch):
        state, metrics = runner.train(state, b, "model")
        steps += 1
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t0, steps

  timed_epoch(1, on_device=False)   # warm-up: allocator, prefetch thread, caches
  pipe_s, steps = timed_epoch(2, on_device=False)
  dev_s, dev_steps = timed_epoch(3, on_device=True)
  pipe_s2, _ = timed_epoch(4, on_device=False)
  lists = steps * batch_size
  rec = {"bench": "ml1m_epoch", "phase": "model", "method": "dnr_g", "lists": num,
         "lists_per_epoch_trained": lists, "steps": steps, "global_batch": batch_size,
         **shapes, "hidden": config.model.hidden, **bench.device_info(runner.devices),
         "split_build_s": build_s, "compile_s": compile_s,
         "epoch_s_pipeline": [pipe_s, pipe_s2], "epoch_s_on_device": dev_s,
         "lists_per_s_pipeline": lists / min(pipe_s, pipe_s2),
         "lists_per_s_on_device": dev_steps * batch_size / dev_s,
         "pipeline_overhead": min(pipe_s, pipe_s2) / dev_s - 1.0,
         "target_epoch_under_5s": min(pipe_s, pipe_s2) < 5.0,
         "l_theta": float(metrics["l_theta"]), "peak_rss_gb": bench.peak_rss_gb(),
         "peak_device_bytes": bench.peak_device_bytes(runner.devices)}
  bench.emit(rec, out)


# Sections that need an optional package (the ``bench`` extra), by module name.
SECTION_NEEDS = {"vs_torch": ("torch",)}


def main(argv):
  del argv
  import jax
  start = time.perf_counter()
  out_dir = os.environ.get("OUT")
  out = open(os.path.join(out_dir, "gpu.jsonl"), "a") if out_dir else None
  bench.emit({"bench": "gpu_check", "start": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                           time.gmtime()),
              "quick": FLAGS.quick, "python": sys.version.split()[0],
              **bench.device_info(jax.local_devices())}, out)
  sections = (("step_fp32", lambda: section_steps(out, "fp32")),
              ("ml1m_epoch", lambda: section_epoch(out)),
              ("vs_torch", lambda: section_vs_torch(out)),
              ("step_bf16", lambda: section_steps(out, "bf16")))
  try:
    for name, run in sections:
      elapsed = time.perf_counter() - start
      if elapsed > FLAGS.budget_s:
        bench.emit({"bench": name, "skipped": f"budget of {FLAGS.budget_s:.0f}s spent "
                                              f"({elapsed:.0f}s)"}, out)
        continue
      missing = [m for m in SECTION_NEEDS.get(name, ())
                 if importlib.util.find_spec(m) is None]
      if missing:
        bench.emit({"bench": name, "unavailable": f"needs {', '.join(missing)}: pip "
                                                  "install -e '.[bench]'"}, out)
        continue
      try:
        run()
      except Exception as e:  # pylint: disable=broad-except  (one try on the GPU)
        bench.emit({"bench": name, "error": f"{type(e).__name__}: {e}"[:2000],
                    "traceback": traceback.format_exc()[-3000:]}, out)
    bench.emit({"bench": "gpu_check", "done": True,
                "total_s": time.perf_counter() - start}, out)
  finally:
    if out is not None:
      out.close()


if __name__ == "__main__":
  app.run(main)
