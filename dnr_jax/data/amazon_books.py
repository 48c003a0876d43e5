"""Amazon-Books (the 2018 Amazon review data, category Books) as a TFDS data set.

The paper's third data set ("Amazon Books", citing Ni, Li & McAuley, *Justifying
recommendations using distantly-labeled reviews and fine-grained aspects*, EMNLP
2019). The release's page, https://nijianmo.github.io/amazon/ (read in its source,
github.com/nijianmo/nijianmo.github.io, ``amazon/index.html`` at commit 13fa86e,
2022-10-18), offers per category, among its "small subsets for experimentation":

* ``Books_5.json.gz``, the **5-core** (27,164,983 reviews: "all users and items have
  at least 5 reviews"), gzipped, "one-review-per-line in json". The page's sample
  review and field list: ``overall`` (the rating, 1.0-5.0), ``verified`` (true /
  false), ``reviewTime`` ("01 1, 2018"), ``reviewerID`` ("A2SUAM1J3GNN3B"), ``asin``
  ("0000013714"), ``style`` (a dictionary, e.g. ``{"Format:": "Hardcover"}``),
  ``reviewerName``, ``reviewText``, ``summary``, ``unixReviewTime`` (unix time, s),
  ``vote`` (helpful votes, a string such as "2") and ``image`` (photo urls), the
  last ones not in every review. The builder reads ``reviewerID``, ``asin``,
  ``overall`` and ``unixReviewTime`` (each required, typed and range-checked) and
  skips the rest; the decompressed ``Books_5.json`` works too.
* ``Books.csv``, **ratings only** (51,311,621 ratings, one per review of the
  category): "no metadata or reviews, but only (item,user,rating,timestamp)
  tuples", a CSV without a header in that column order. (The page said
  "(user,item,rating,timestamp)" until its revision of 2020-09-11, a366825; LensKit's
  reader of the 2018 files, ``lenskit.data.amazon.open_az_2018``, also reads
  ``item_id, user_id, rating, timestamp``.)

No checksum is published for either file, and neither comes in an archive: the
builder validates every line instead, and does not download (the files are links on
the page; put them into ``source_dir``).

Which file feeds which stage: config ``books`` (the default) reads the 5-core
reviews as the interaction log, ``books_ratings`` the ratings-only file. They hold
the same ratings, one row a review, and k-cores nest (the 20-core of a log is the
20-core of its 5-core), so the paper's 20-core of either is the same rows, up to
reviews the release may list twice (it does not say). ``books`` reads half the rows
(but decompresses and scans their review text); ``books_ratings`` is a 2.1 GB CSV. One
log feeds every stage, the MF retriever (the positives of the earliest part of the
timeline) and the lists (the later events), as for MovieLens: the retriever's
vocabulary of users and items must be the lists'. The paper reports for Books, after
its 20-core, 35,732 users, 38,121 items and 1,960,674 actions for the retriever
stage, and 311,386 reranker sequences; it does not say how it got there from the
release, and the project has not run the real files, so whether their 20-core gives
these counts is unchecked (``docs/data.md``).

Ratings are positive at ``threshold`` (4) or more (``ratings``); reviewer ids and
ASINs are strings (an ASIN keeps its leading zeros), coded 1.. in order of first
appearance, their vocabularies beside the prepared data set (``raw.read_ids``).
There are no user or item features. ``sample`` is a generated data set in both
files' schema (NOT real data, ``samples.write_amazon_books``), read as ``books``.
"""

from __future__ import annotations

from dnr_jax.data import ratings
from dnr_jax.data import raw
from dnr_jax.data import stream
from dnr_jax.data.csv_reader import Column, FileSpec

HOMEPAGE = "https://nijianmo.github.io/amazon/"
REVIEWS_FILE = "Books_5.json.gz"
RATINGS_FILE = "Books.csv"
RATINGS_NAMES = ("item", "user", "rating", "timestamp")   # the CSV's columns, in order


# Per source file: the log's columns (the file's own names) and what the file is.
SOURCES = {
    REVIEWS_FILE: (ratings.LogColumns(user="reviewerID", item="asin", rating="overall",
                                      time="unixReviewTime"), "5-core reviews"),
    RATINGS_FILE: (ratings.LogColumns(user="user", item="item", rating="rating",
                                      time="timestamp"), "ratings only"),
}


def _log(file: str, spec: FileSpec) -> tuple[raw.Table, ...]:
  c = SOURCES[file][0]
  return (raw.Table("log", (file,), (
      Column(c.rating, kind="float", dtype="float32", min=1, max=5),
      Column(c.time, dtype="int64", min=0)), ids=(c.user, c.item), spec=spec),)


_REVIEWS = _log(REVIEWS_FILE, FileSpec(format="jsonl"))
_RATINGS = _log(RATINGS_FILE, FileSpec(header=False, names=RATINGS_NAMES))

CONFIGS = {
    "books": raw.RawConfig(
        name="books", tables=_REVIEWS, homepage=HOMEPAGE,
        description="Amazon review data (2018), Books, the 5-core reviews "
                    "(27,164,983)."),
    "books_ratings": raw.RawConfig(
        name="books_ratings", tables=_RATINGS, homepage=HOMEPAGE,
        description="Amazon review data (2018), Books, ratings only (51,311,621)."),
    "sample": raw.RawConfig(
        name="sample", tables=_REVIEWS, homepage=HOMEPAGE, is_sample=True,
        description="Generated Amazon-Books-schema sample: NOT real data."),
}


class AmazonBooks(raw.RawBuilder, skip_registration=True):
  """Amazon Books ratings, prepared from the release's 5-core or ratings-only file."""

  BUILDER_CONFIGS = list(CONFIGS.values())


def log_stream(builder: AmazonBooks, threshold: int = 4) -> stream.LogStream:
  """The prepared ratings as a ``stream.LogStream``: label = rating >= ``threshold``."""
  columns, what = SOURCES[builder.builder_config.tables[0].files[0]]
  return ratings.log_stream(builder, columns, threshold, f"Amazon-Books ({what})")
