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
``--export=DIR`` writes the ``jax.export`` artifact (``--lists`` may then be left
out). Only ``experiments.cli`` is imported, not the training flags: the model comes
from the checkpoint. Bad inputs stop with one line (``cli.run_main``).
"""

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
flags.DEFINE_string("export", None, "Also write the jax.export artifact to this folder.")
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
  cli.setup()
  bundle = serving.load_bundle(FLAGS.checkpoint)
  logging.info("JAX %s on %d %s device(s); bundle %s", jax.__version__,
               jax.local_device_count(), jax.default_backend(), bundle.directory)
  if FLAGS.export:
    sig = serving.export_reranker(bundle, FLAGS.export)
    print(f"exported for {', '.join(sig['platforms'])}: {FLAGS.export}")
  if not FLAGS.lists:
    return
  report = reranking.rerank_file(
      bundle, FLAGS.lists, FLAGS.output, interactions=FLAGS.interactions,
      top_k=FLAGS.top_k, chunk_rows=FLAGS.chunk_rows or None,
      batch_size=FLAGS.rerank_batch_size or None)
  s = report["stats"]
  print(f"reranked {report['lists']:,} lists ({report['rows']:,} candidates) in "
        f"{report['seconds']:.1f}s: {report['lists_per_s']:,.0f} lists/s on "
        f"{jax.local_device_count()} {jax.default_backend()} device(s); wrote "
        f"{report['written_rows']:,} rows to {FLAGS.output}")
  unknown = ", ".join(f"{k} {v:,}" for k, v in sorted(s["unknown"].items()) if v)
  print(f"unknown ids (mapped to 0): {unknown or 'none'}; lists cut to n: "
        f"{s['truncated_lists']:,}; padded: {s['padded_lists']:,}; without history: "
        f"{s['lists_without_history']:,}")
  if report["metrics"]:
    title = (f"{FLAGS.lists}: reranker ({bundle.config.model.backbone}/"
             f"{bundle.config.method}) vs the upstream order, metrics (%) at "
             f"K={bundle.config.eval_k}")
    print(reranking.metrics_table(bundle, report["metrics"],
                                  f"{FLAGS.output}.metrics.md",
                                  f"{FLAGS.output}.metrics.csv", title))


if __name__ == "__main__":
  cli.run_main(run)   # a user's mistake: one line, no traceback
