r"""Rerank your own lists with a trained run, and export the reranker.

  python -m experiments.rerank --checkpoint=/tmp/dnr_lists_example/runs/prm/dnr_g/seed0 \
      --lists=NEW_LISTS.parquet --output=/tmp/reranked.parquet [--top_k=6] \
      [--interactions=CLICKS.parquet] [--export=/tmp/dnr_exported]

``--checkpoint`` is a run directory of ``experiments.lists`` (its ``bundle/``), a
bundle directory, or a work directory holding a single run: the model, its selected
epoch's parameters, the data config and the vocabulary come from there, so no model
flag is repeated. The lists file is in the own-lists format, labels optional; the
output is Parquet (``dnr_jax/serving/rerank_files.py`` lists its columns), written
atomically. With labels, the training table (reranker vs the upstream order) is
printed and written beside the output (``<output>.metrics.md`` / ``.csv``).
``--export=DIR`` writes the exported reranker, ``--export_format=jax,onnx,triton``
choosing the formats (``--lists`` may then be left out). Only ``experiments.cli`` is
imported, not the training flags: the model comes
from the checkpoint. Bad inputs stop with one line (``cli.run_main``); the output
paths are checked before the bundle is loaded, so a typo never costs the scoring.
SIGINT (Ctrl-C) and SIGTERM stop the run between chunks, with one line and exit
status 75, and leave no partial output (``rerank_files``).
"""

import os

from absl import app, flags, logging

from dnr_jax import errors
from experiments import cli

flags.DEFINE_string("checkpoint", None, "A run directory, bundle or one-run workdir.")
flags.DEFINE_string("lists", None, "The lists to rerank (own-lists format, Parquet or "
                    "CSV; labels optional).")
flags.DEFINE_string("output", None, "The Parquet file to write.")
flags.DEFINE_string("interactions", None, "Interactions file the histories come from "
                    "(else the lists' 'history' column, else empty histories).")
flags.DEFINE_integer("top_k", 0, "Keep each list's top K of the new order (0: all).")
flags.DEFINE_integer("chunk_rows", 0, "Rows read at once (0: the run's data config).")
flags.DEFINE_integer("rerank_batch_size", 0, "Lists per scoring step across the devices "
                     "(0: the run's evaluation batch).")
flags.DEFINE_string("export", None, "Also write the exported reranker to this folder "
                    "(--export_format says which formats).")
flags.DEFINE_list("export_format", ["jax"], "With --export: any of jax (reranker.jax), "
                  "onnx (reranker.onnx; pip install -e '.[serve]'), triton (a Triton model "
                  "repository in DIR/triton/; implies onnx).")
flags.DEFINE_string("triton_model_name", "dnr_reranker", "With triton: the model name.")
flags.DEFINE_integer("triton_max_batch_size", 128, "With triton: Triton's max_batch_size.")
flags.DEFINE_integer("triton_cpu_instances", 0, "With triton: model instances on CPU "
                     "(an instance_group of KIND_CPU; 0: Triton's default).", lower_bound=0)
flags.DEFINE_integer("triton_intra_op_threads", 0, "With triton: ONNX Runtime's intra-op "
                     "threads per instance (0: its default, one per core).", lower_bound=0)
flags.mark_flag_as_required("checkpoint")
FLAGS = flags.FLAGS


def run(argv) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from dnr_jax import serving  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving import rerank_files as reranking  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.lists and not FLAGS.export:
    raise errors.ConfigError("give --lists (and --output) to rerank, and/or --export")
  if FLAGS.lists and not FLAGS.output:
    raise errors.ConfigError("--lists needs --output (the Parquet file to write)")
  check_outputs(FLAGS.output if FLAGS.lists else None, FLAGS.export)
  if FLAGS["export_format"].present and not FLAGS.export:
    raise errors.ConfigError("--export_format needs --export (the folder to write)")
  # A bad format or a missing serve extra: one line, before any work.
  formats = serving.check_formats(FLAGS.export_format) if FLAGS.export else None
  cli.setup()
  # rerank_file turns SIGINT / SIGTERM into stop requests between its chunks; before
  # and after it, Ctrl-C raises KeyboardInterrupt in Python code: one line too.
  stage = "before reranking began: stopped"
  try:
    bundle = serving.load_bundle(FLAGS.checkpoint)
    logging.info("JAX %s on %d %s device(s); bundle %s", jax.__version__,
                 jax.local_device_count(), jax.default_backend(), bundle.directory)
    if FLAGS.export:
      stage += f" (the export to {FLAGS.export} may be incomplete)"
      sig = serving.export_reranker(bundle, FLAGS.export, formats=formats,
                                    triton_model_name=FLAGS.triton_model_name,
                                    triton_max_batch_size=FLAGS.triton_max_batch_size,
                                    triton_cpu_instances=FLAGS.triton_cpu_instances,
                                    triton_intra_op_threads=FLAGS.triton_intra_op_threads)
      what = [f"jax for {', '.join(sig['platforms'])}" if sig["file"] else "",
              "onnx" if "onnx" in sig else "",
              f"triton {sig['triton']['repository']}/{sig['triton']['model']}"
              if "triton" in sig else ""]
      print(f"exported {', '.join(w for w in what if w)}: {FLAGS.export}")
    if not FLAGS.lists:
      return
    stage = "while reranking: stopped"
    report = reranking.rerank_file(
        bundle, FLAGS.lists, FLAGS.output, interactions=FLAGS.interactions,
        top_k=FLAGS.top_k, chunk_rows=FLAGS.chunk_rows or None,
        batch_size=FLAGS.rerank_batch_size or None)
    stage = (f"after {FLAGS.output} was written (it is complete); the summary and "
             "the metrics table were not")
    summarize(bundle, report)
  except KeyboardInterrupt:
    raise errors.Interrupted(f"SIGINT received {stage}") from None


def summarize(bundle, report) -> None:
  """Prints what the run did and, with labels, the metrics table (and writes it)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving import rerank_files as reranking  # pylint: disable=g-import-not-at-top
  s = report["stats"]
  print(f"reranked {report['lists']:,} lists ({report['rows']:,} candidates) in "
        f"{report['seconds']:.1f}s: {report['lists_per_s']:,.0f} lists/s on "
        f"{jax.local_device_count()} {jax.default_backend()} device(s); wrote "
        f"{report['written_rows']:,} rows to {FLAGS.output}")
  unknown = ", ".join(f"{k} {v:,}" for k, v in sorted(s["unknown"].items()) if v)
  print(f"unknown ids (mapped to 0): {unknown or 'none'}; lists cut to n: "
        f"{s['truncated_lists']:,}; padded: {s['padded_lists']:,}; without history: "
        f"{s['lists_without_history']:,}")
  if s["truncated_candidates"]:
    n = bundle.meta.get("list_size")
    print(f"candidates beyond n = {n}: {s['truncated_candidates']:,} in "
          f"{s['truncated_lists']:,} lists, not reranked; "
          f"{report['not_reranked_rows']:,} of them written after each list's "
          "reranked ones, in upstream order (reranked = False)")
  if report["metrics"]:
    title = (f"{FLAGS.lists}: reranker ({bundle.config.model.backbone}/"
             f"{bundle.config.method}) vs the upstream order, metrics (%) at "
             f"K={bundle.config.eval_k}")
    print(reranking.metrics_table(bundle, report["metrics"],
                                  f"{FLAGS.output}.metrics.md",
                                  f"{FLAGS.output}.metrics.csv", title))


def check_outputs(output, export) -> None:
  """Fails in one line, before any work, on an output path that cannot be used: an
  ``--output`` that is a folder or in a missing folder, an ``--export`` that is a
  file."""
  from dnr_jax.serving import rerank_files  # pylint: disable=g-import-not-at-top
  if output:
    rerank_files.check_output(output)
  if export and os.path.exists(export) and not os.path.isdir(export):
    raise errors.ConfigError(f"--export={export} is an existing file; give a folder "
                             "(it receives reranker.jax, signature.json and "
                             "vocabulary/)")
  if export and output and os.path.abspath(export) == os.path.abspath(output):
    raise errors.ConfigError(f"--export and --output are both {export}")


if __name__ == "__main__":
  cli.run_main(run)   # a user's mistake: one line, no traceback
