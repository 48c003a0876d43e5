r"""The paper's protocol on synthetic planted-preference lists (no download needed).

  python -m experiments.synthetic --workdir=/tmp/dnr_synthetic \
      --methods=backbone,c_score,dnr_g --seeds=0,1,2

The lists are generated (dnr_jax.synthetic), not real data, and the log and the
results table say so. Nothing here imports TFDS, which the data-set binaries need
and which costs seconds at start-up.
"""

import jax
from absl import app, flags, logging

from dnr_jax import config as config_lib
from dnr_jax import synthetic
from dnr_jax.protocol import experiment
from experiments import cli, train_flags

flags.DEFINE_integer("num_users", 150, "Synthetic users.")
flags.DEFINE_integer("num_items", 120, "Synthetic items.")
flags.DEFINE_integer("list_size", 20, "Candidates per list.")
flags.DEFINE_integer("train_lists", 3072, "Training lists (valid and test: 1/6 each).")
flags.DEFINE_float("retriever_noise", 1.5, "Std of the synthetic retriever's error.")
flags.DEFINE_enum("score_model", "persistent", list(synthetic.SCORE_MODELS),
                  "How the retriever's scores arise: persistent per (user, item) error, "
                  "fresh error per impression, or DNR's own Eq. 4 noise on the feedback.")
flags.DEFINE_float("score_lambda", 0.85,
                   "lambda of the eq4 score model (0.85: raw-score AUC about 0.70).")
flags.DEFINE_integer("data_seed", 0, "Seed of the generated data set.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS

# Small and fast by default: a CPU finishes the three default methods in minutes.
BASE = config_lib.TrainConfig(
    model=config_lib.ModelConfig(hidden=32, num_heads=2, dropout=0.1),
    noise=config_lib.NoiseConfig(generator_hidden=16),
    warmup_epochs=3, num_epochs=6, global_batch_size=64, eval_batch_size=512,
    learning_rate=1e-2, weight_decay=0.0, log_every_steps=0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.input != "memory":
    raise app.UsageError("--input=disk reads prepared lists; the synthetic lists are "
                         "generated in memory")
  train_flags.setup()
  exp = train_flags.experiment_from_flags(BASE)
  cli.check_workdir(FLAGS.workdir, create=not FLAGS.check_flags)
  if FLAGS.check_flags:
    train_flags.print_checked(exp)
    return
  logging.info("JAX %s on %d %s device(s)", jax.__version__, jax.local_device_count(),
               jax.default_backend())
  n = FLAGS.train_lists
  data = synthetic.generate(synthetic.SyntheticConfig(
      num_users=FLAGS.num_users, num_items=FLAGS.num_items, list_size=FLAGS.list_size,
      num_lists=(n, n // 6, n // 6), retriever_noise=FLAGS.retriever_noise,
      score_model=FLAGS.score_model, score_lambda=FLAGS.score_lambda,
      seed=FLAGS.data_seed))
  out = experiment.run_experiment(exp, data, FLAGS.workdir)
  print(out["table"])


if __name__ == "__main__":
  cli.run_main(main)
