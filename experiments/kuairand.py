r"""The paper's protocol on KuaiRand (the embedded sample, Pure, 1K or 27K).

  python -m experiments.kuairand --flagfile=experiments/configs/demo.flags
  python -m experiments.kuairand --flagfile=experiments/configs/kuairand_pure.flags \
      --source_dir=/data/kuairand --workdir=/tmp/dnr_kuairand_pure

Flags in, one library call per stage (``prepare_lists``, ``run_experiment``), results
out: ``<workdir>/results.md`` / ``results.csv``, metrics.jsonl, TensorBoard events,
checkpoints and plots per run. ``--variant=sample`` (the default) generates a small
KuaiRand-Pure-schema data set: NOT the real data, and the log and table say so.
"""

from absl import flags

from dnr_jax.data import kuairand
from experiments import cli, dataset_main, train_flags

train_flags.define_data_flags("kuairand", kuairand.CONFIGS, "sample")
flags.mark_flag_as_required("workdir")

if __name__ == "__main__":
  cli.run_main(dataset_main.main)
