r"""Benchmark: the exported ONNX reranker in ONNX Runtime against the JAX scorer.

  python -m benchmarks.onnx_scoring --checkpoint=RUN [--batch_sizes=1,16,64] \
      [--lists=4096] [--rounds=5] [--ort_threads=0] [--traced]

What the model part of an ONNX serving stack (Triton's ONNX Runtime backend, ONNX
Runtime in C++ or Java) costs per list on this machine, beside the in-process JAX
scorer that ``benchmarks.serving`` takes as its ceiling. Exports ``--checkpoint``'s
reranker with ``serving.export_reranker(formats=("onnx",))`` into a temporary
directory, then scores the run's own lists (``--lists`` of them, repeated as needed)
in batches of each of ``--batch_sizes``: with ONNX Runtime's CPU provider (one
``InferenceSession.run`` per batch, the batch's inputs sliced from the lists'
arrays and cast inside the timing) and with ``serving.Scorer`` at the same batch
size (its own batching and padding inside the timing too), one pass of each in
turn for ``--rounds`` rounds (the order swapped every round: the machine's speed
drifts).
With ``--traced``, a third side: the same reranker exported without
``onnx_graph.simplify`` (``export_onnx(..., simplify=False)``, the graph as jax2onnx
traces it), timed in the same rounds, so the simplification's gain is measured on
one machine at one time (the first line's ``traced_nodes`` counts its nodes;
``graph`` is the simplified graph's ``signature.json`` entry).
Printed per batch size, one JSON line: the median lists/s of each, the median of
the rounds' ONNX Runtime / JAX ratios (and simplified / traced), and the largest
absolute difference between their logits. Needs the serve extra.
"""

import json
import statistics
import tempfile
import time

from absl import app, flags
import numpy as np

from benchmarks import run_requests

flags.DEFINE_string("checkpoint", None, "A trained own-lists run (experiments.lists).")
flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "Lists per call.")
flags.DEFINE_integer("lists", 4096, "Lists scored per pass.")
flags.DEFINE_integer("rounds", 5, "Passes of each, alternated.")
flags.DEFINE_integer("ort_threads", 0, "ONNX Runtime's intra-op threads (0: its "
                     "default, one per core).")
flags.DEFINE_bool("traced", False, "Also time the graph as jax2onnx traces it "
                  "(export_onnx(simplify=False)).")
flags.mark_flag_as_required("checkpoint")
flags.register_validator("lists", lambda n: n >= 1, "--lists must be at least 1")
flags.register_validator("batch_sizes", lambda bs: all(int(b) >= 1 for b in bs),
                         "--batch_sizes must be positive integers")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  from dnr_jax import serving  # pylint: disable=g-import-not-at-top
  bundle = serving.load_bundle(FLAGS.checkpoint)
  _, arrays = run_requests.request_bodies(bundle, 1)
  n = FLAGS.lists
  reps = -(-n // len(arrays["items"]))
  big = {k: np.concatenate([v] * reps)[:n] for k, v in arrays.items()}
  with tempfile.TemporaryDirectory() as directory:
    sig = serving.export_reranker(bundle, directory, formats=("onnx",))
    options = ort.SessionOptions()
    options.intra_op_num_threads = FLAGS.ort_threads
    session = ort.InferenceSession(f"{directory}/{sig['onnx']['file']}", options,
                                   providers=["CPUExecutionProvider"])
    traced = None
    if FLAGS.traced:
      from dnr_jax.serving import export as export_lib  # pylint: disable=g-import-not-at-top
      from dnr_jax.serving import onnx_export  # pylint: disable=g-import-not-at-top
      path = f"{directory}/traced.onnx"
      traced_info = onnx_export.export_onnx(
          bundle, path, inputs=export_lib.EXPORT_INPUTS,
          list_size=bundle.meta["list_size"],
          history_size=bundle.meta["history_size"], simplify=False)
      traced = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  inputs = [(i["name"], i["dtype"]) for i in sig["inputs"]]
  output = sig["output"]["name"]
  print(json.dumps({"what": "exported", "inputs": [name for name, _ in inputs],
                    "lists": n, "ort": ort.__version__,
                    "graph": sig["onnx"]["graph"],
                    "traced_nodes": (traced_info["graph"]["nodes"]
                                     if traced is not None else None)}),
        flush=True)
  for b in (int(x) for x in FLAGS.batch_sizes):
    # Whole batches of b; fewer than b lists make one short batch.
    scored = n - n % b or n
    starts = range(0, scored, b)
    part = {k: v[:scored] for k, v in big.items()}

    def feeds(part=part, starts=starts, b=b):
      # Slicing and casting the inputs counts, as the JAX scorer's batching does.
      for s in starts:
        yield {name: np.ascontiguousarray(part[name][s:s + b], dtype)
               for name, dtype in inputs}

    session.run([output], next(feeds()))
    scorer = serving.Scorer(bundle, batch_size=b)
    scorer.score({k: v[:b] for k, v in part.items()})   # compile
    runs = {
        "ort": lambda: np.concatenate([session.run([output], f)[0] for f in feeds()]),
        "jax": lambda: scorer.score(part)[0]}
    if traced is not None:
      traced.run([output], next(feeds()))
      runs["traced"] = lambda: np.concatenate([traced.run([output], f)[0]
                                               for f in feeds()])
    rates, logits = {side: [] for side in runs}, {}
    for r in range(FLAGS.rounds):
      for side in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
        t0 = time.perf_counter()
        logits[side] = runs[side]()
        rates[side].append(scored / (time.perf_counter() - t0))
    diff = np.abs(logits["ort"] - logits["jax"])[part["mask"]].max()
    line = {"batch_size": b, "lists": scored,
            "onnx_runtime_lists_per_s": round(statistics.median(rates["ort"]), 1),
            "jax_scorer_lists_per_s": round(statistics.median(rates["jax"]), 1),
            "onnx_over_jax": round(statistics.median(
                o / j for o, j in zip(rates["ort"], rates["jax"])), 3),
            "max_abs_diff": float(diff)}
    if traced is not None:
      line.update({
          "traced_lists_per_s": round(statistics.median(rates["traced"]), 1),
          "simplified_over_traced": round(statistics.median(
              o / t for o, t in zip(rates["ort"], rates["traced"])), 3),
          "traced_max_abs_diff": float(np.abs(logits["traced"] - logits["jax"])[
              part["mask"]].max())})
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
