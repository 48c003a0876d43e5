r"""Combine the results of several experiment runs into one table.

  python -m experiments.combine --out=docs/results/movielens_100k_real \
      --title="MovieLens-100k (real ratings)" \
      --results=RUN_A/results.json,RUN_B/results.json [--ignore_config=FIELD,...]

For seeds run in separate sessions or jobs: reads each ``results.json`` (written by
``experiments.movielens`` and the other experiment binaries), checks that they are
runs of the same data and, row by row, of the same configuration but for the seed,
and writes ``results.md`` / ``.csv`` / ``.json`` of the whole table (mean ± std over
all seeds, the paired t-tests) into ``--out``. A run given twice is taken from the
later file (``dnr_jax/protocol/combine.py``).
"""

from absl import flags

from dnr_jax import errors
from experiments import cli

flags.DEFINE_list("results", None, "The results.json files, in order.")
flags.DEFINE_string("out", None, "The folder to write the combined table into.")
flags.DEFINE_string("title", "Combined results", "The table's title (the data set).")
flags.DEFINE_list("ignore_config", [], "Dotted config fields allowed to differ between "
                  "the seeds of a row (recorded in results.json).")
flags.mark_flags_as_required(["results", "out"])
FLAGS = flags.FLAGS


def run(argv) -> None:
  from dnr_jax.protocol import combine  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  cli.check_workdir(FLAGS.out, flag="--out")
  combined = combine.combine(FLAGS.results, ignore_fields=FLAGS.ignore_config)
  print(combine.write(combined, FLAGS.out, FLAGS.title))


if __name__ == "__main__":
  cli.run_main(run)
