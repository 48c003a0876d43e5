r"""Bring your own lists: DNR on lists your own retriever served.

  python -m experiments.lists --flagfile=experiments/configs/lists_example.flags
  python -m experiments.lists --flagfile=experiments/configs/lists_example.flags \
      --lists=/data/my_lists.parquet --interactions=/data/my_clicks.parquet \
      --workdir=/tmp/dnr_my_lists

The files are in the own-lists format (``dnr_jax.data.own_lists`` documents it;
README: "Bring your own lists"). Without ``--lists`` the binary generates an example
in that format (NOT real data; the log and the table say so). Flags in, one library
call per stage (``prepare_own_lists``, ``run_experiment``), results out as in
``experiments.kuairand``; the work directory also gets what reranking later needs:
``vocab/vocab.json`` (the id vocabulary) and ``data_config.json`` (the data config).
"""

import dataclasses
import os

from absl import app, flags, logging

from dnr_jax import errors
from dnr_jax.data import own_lists
from experiments import cli, train_flags

_D = own_lists.OwnListsConfig()
flags.DEFINE_string("lists", None, "Your lists file (Parquet or CSV, the own-lists "
                    "format); none: the generated example (NOT real data).")
flags.DEFINE_string("interactions", None, "Optional interactions file (user_id, "
                    "item_id, time[, label]) the histories come from.")
flags.DEFINE_integer("list_size", 20, "n, candidates per list (longer lists are cut "
                     "in upstream order, shorter ones padded).")
flags.DEFINE_integer("history_size", 20, "H, history items per list.")
flags.DEFINE_string("user_prefix", _D.user_prefix, "Prefix of user feature columns.")
flags.DEFINE_string("item_prefix", _D.item_prefix, "Prefix of item feature columns.")
flags.DEFINE_enum("score_transform", _D.score_transform, own_lists.SCORE_TRANSFORMS,
                  "none: scores are in [0, 1]; sigmoid: scores are logits.")
flags.DEFINE_string("history_separator", _D.history_separator,
                    "Separator of the ids in a CSV 'history' column.")
flags.DEFINE_enum("split", _D.split, own_lists.SPLIT_MODES,
                  "auto: the 'split' column, else by 'time', else file order.")
flags.DEFINE_float("valid_fraction", _D.valid_fraction, "Valid share of the lists "
                   "(split by time).")
flags.DEFINE_float("test_fraction", _D.test_fraction, "Test share of the lists (the "
                   "latest).")
flags.DEFINE_integer("min_id_count", _D.min_id_count, "Users and items seen fewer "
                     "times (rows naming them, in every file) share the unknown row: "
                     "bounds the tables of a long tail (1: every id its own row).")
flags.DEFINE_integer("id_buckets", _D.id_buckets, "If > 0: user and item ids hashed "
                     "into this many rows (a fixed table size, new ids included; ids "
                     "may share rows). 0: one row per id.")
flags.DEFINE_string("data_dir", None, "Where prepared data goes (default $DNR_DATA_DIR "
                    "or ~/.cache/dnr_jax/datasets).")
flags.DEFINE_integer("example_users", 300, "Generated example: users.")
flags.DEFINE_integer("example_items", 400, "Generated example: items.")
flags.DEFINE_integer("example_lists_per_user", 12, "Generated example: lists per user.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def data_config_from_flags() -> own_lists.OwnListsConfig:
  config = own_lists.OwnListsConfig(
      lists=FLAGS.lists, interactions=FLAGS.interactions, list_size=FLAGS.list_size,
      history_size=FLAGS.history_size, user_prefix=FLAGS.user_prefix,
      item_prefix=FLAGS.item_prefix, score_transform=FLAGS.score_transform,
      history_separator=FLAGS.history_separator, split=FLAGS.split,
      valid_fraction=FLAGS.valid_fraction, test_fraction=FLAGS.test_fraction,
      min_id_count=FLAGS.min_id_count, id_buckets=FLAGS.id_buckets,
      data_dir=FLAGS.data_dir)
  config.validate()
  if FLAGS.interactions and not FLAGS.lists:
    raise errors.ConfigError("--interactions needs --lists (the example brings its "
                             "own interactions)")
  return config


def run(argv) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from dnr_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from dnr_jax.protocol import experiment  # pylint: disable=g-import-not-at-top
  from dnr_jax.data import list_records  # pylint: disable=g-import-not-at-top
  from dnr_jax.data import raw  # pylint: disable=g-import-not-at-top
  from dnr_jax.data.own_lists import sample  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_flags.setup(tfds=True)
  # Every flag is checked before any data work starts.
  exp = train_flags.experiment_from_flags()
  data_config = data_config_from_flags()
  train_flags.check_runs(exp, data_config.list_size)
  cli.check_workdir(FLAGS.workdir, create=not FLAGS.check_flags)
  if FLAGS.check_flags:
    train_flags.print_checked(exp, data_config)
    return
  logging.info("JAX %s on %d %s device(s)", jax.__version__, jax.local_device_count(),
               jax.default_backend())

  def prepare(data_config):
    if data_config.lists is None:
      lists, inter = sample.ensure_example(
          data_config.data_dir or raw.default_data_dir(),
          sample.ExampleConfig(
              num_users=FLAGS.example_users, num_items=FLAGS.example_items,
              lists_per_user=FLAGS.example_lists_per_user))
      logging.warning("no --lists given: using the GENERATED example %s (NOT real "
                      "data)", lists)
      data_config = dataclasses.replace(data_config, lists=lists, interactions=inter)
    return data_config, own_lists.prepare_own_lists(
        data_config, on_disk=("train",) if FLAGS.input == "disk" else ())

  # Multi-process: process 0 prepares first (dnr_jax.runtime.distributed.primary_first).
  data_config, data = distributed.primary_first(lambda: prepare(data_config),
                                                "prepare_own_lists")
  distributed.check_same(distributed.fingerprint(list_records.comparable(data.splits)),
                         "the prepared lists")
  if distributed.is_primary():
    os.makedirs(FLAGS.workdir, exist_ok=True)
    record = own_lists.save_for_run(FLAGS.workdir, data_config,
                                    data.report["vocab_dir"])
    logging.info("vocabulary and data config for reranking: %s", record)
  # Every run's bundle carries them too: experiments.rerank --checkpoint=<run dir>.
  out = experiment.run_experiment(exp, data, FLAGS.workdir, bundle_assets={
      "data_config": dataclasses.asdict(data_config),
      "vocabulary_dir": os.path.join(FLAGS.workdir, "vocab")})
  print(out["table"])
  print(f"outputs: {FLAGS.workdir} (vocab/vocab.json and data_config.json for "
        "reranking; each run's bundle/ for experiments.rerank)")
  run_dir = os.path.join(FLAGS.workdir, "runs", exp.backbones[0], exp.methods[-1],
                         f"seed{exp.seeds[0]}")
  inter = (f" --interactions={data_config.interactions}" if data_config.interactions
           else "")
  print(f"rerank lists with: python -m experiments.rerank --checkpoint={run_dir} "
        f"--lists={data_config.lists}{inter} --output=reranked.parquet")


def main(argv) -> None:
  run(argv)


if __name__ == "__main__":
  cli.run_main(main)   # a user's mistake: one line, no traceback
