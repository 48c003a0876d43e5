r"""Trains DNR on synthetic planted-preference lists (no download, runs anywhere).

  python -m experiments.synthetic --method=dnr_g --num_epochs=8 --workdir=/tmp/dnr_syn

The data is generated (dnr_jax.synthetic), not real: the log says so.
"""

import json
import os

import jax
from absl import app, flags, logging

from dnr_jax import synthetic, train
from experiments import common

flags.DEFINE_integer("num_users", 400, "Synthetic users.")
flags.DEFINE_integer("num_items", 500, "Synthetic items.")
flags.DEFINE_integer("list_size", 20, "Candidates per list.")
flags.DEFINE_integer("train_lists", 8000, "Training lists.")
flags.DEFINE_float("retriever_noise", 1.0, "Std of the synthetic retriever's error.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("JAX %s on %d %s device(s)", jax.__version__, jax.local_device_count(),
               jax.default_backend())
  config = common.config_from_flags()
  data = synthetic.generate(synthetic.SyntheticConfig(
      num_users=FLAGS.num_users, num_items=FLAGS.num_items, list_size=FLAGS.list_size,
      num_lists=(FLAGS.train_lists, FLAGS.train_lists // 5, FLAGS.train_lists // 5),
      retriever_noise=FLAGS.retriever_noise, seed=FLAGS.seed))
  result = train.train_and_evaluate(config, data, FLAGS.workdir)
  summary = {k: result[k] for k in ("best_epoch", "valid", "test", "retriever", "data")}
  print(json.dumps(summary, indent=2))
  if FLAGS.workdir:
    with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
      json.dump(summary, f, indent=2)
    logging.info("results in %s", FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
