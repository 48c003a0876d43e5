r"""The paper's protocol on MovieLens (ML-1M as in the paper, or ML-100k).

  python -m experiments.movielens --flagfile=experiments/configs/movielens_1m.flags \
      --source_dir=/data/movielens --workdir=/tmp/dnr_ml1m

Lists use the ``retrieval`` protocol by default (MovieLens has no impressions): the
retriever's top n, labelled by the user's next W positive ratings. Outputs as in
``experiments.kuairand``.
"""

from absl import flags

from dnr_jax.data import movielens
from experiments import cli, dataset_main, train_flags

train_flags.define_data_flags("movielens", movielens.CONFIGS, "1m")
flags.mark_flag_as_required("workdir")

if __name__ == "__main__":
  cli.run_main(dataset_main.main)
