r"""The paper's protocol on Amazon-Books (the 2018 Amazon review data, category Books).

  python -m experiments.amazon_books --flagfile=experiments/configs/amazon_books.flags \
      --source_dir=/data/amazon --workdir=/tmp/dnr_books

``--source_dir`` holds ``Books_5.json.gz`` (the 5-core reviews, ``--variant=books``) or
``Books.csv`` (ratings only, ``--variant=books_ratings``) from
https://nijianmo.github.io/amazon/ (no download: no checksum is published). Lists use
the ``retrieval`` protocol, as MovieLens (no impressions). Outputs as in
``experiments.kuairand``.
"""

from absl import flags

from dnr_jax.data import amazon_books
from experiments import cli, dataset_main, train_flags

train_flags.define_data_flags("amazon_books", amazon_books.CONFIGS, "books")
flags.mark_flag_as_required("workdir")

if __name__ == "__main__":
  cli.run_main(dataset_main.main)
