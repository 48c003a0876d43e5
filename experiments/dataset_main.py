"""The ``main`` of the TFDS data-set binaries (``experiments.kuairand``, ``.movielens``,
``.amazon_books``).

A binary defines its data flags (``train_flags.define_data_flags``) and runs
``cli.run_main(dataset_main.main)``: flags -> DataConfig + experiment -> lists ->
results.
"""

from absl import app, flags, logging

from experiments import cli, train_flags

FLAGS = flags.FLAGS


def main(argv) -> None:
  """Checks every flag and where the outputs go, prepares the lists, runs the experiment."""
  import jax  # pylint: disable=g-import-not-at-top
  from dnr_jax.data import list_records  # pylint: disable=g-import-not-at-top
  from dnr_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from dnr_jax.protocol import experiment  # pylint: disable=g-import-not-at-top
  from dnr_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_flags.setup(tfds=True)
  # Every flag, and where the outputs go, is checked before any data work starts.
  exp = train_flags.experiment_from_flags()
  data_config = train_flags.data_config_from_flags()
  train_flags.check_runs(exp, data_config.lists.list_size)
  cli.check_workdir(FLAGS.workdir, create=not FLAGS.check_flags)
  cli.check_workdir(prepare.data_dir(data_config), create=not FLAGS.check_flags,
                    flag="--data_dir")
  if FLAGS.check_flags:
    train_flags.print_checked(exp, data_config)
    return
  logging.info("JAX %s on %d %s device(s)", jax.__version__, jax.local_device_count(),
               jax.default_backend())
  # Process 0 prepares (and caches) the lists first; the others then read its cache
  # or, on a file system of their own, repeat the same deterministic preparation.
  on_disk = ("train",) if FLAGS.input == "disk" else ()
  data = distributed.primary_first(
      lambda: prepare.prepare_lists(data_config, on_disk=on_disk), "prepare_lists")
  distributed.check_same(distributed.fingerprint(list_records.comparable(data.splits)),
                         "the prepared lists")
  out = experiment.run_experiment(exp, data, FLAGS.workdir)
  print(out["table"])
  print(f"outputs: {FLAGS.workdir}")
