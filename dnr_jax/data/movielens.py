"""MovieLens (GroupLens) 100k and 1M as a TFDS data set, and its interaction log.

The paper's ML-1M experiment, and ML-100k for quick runs; ``sample`` is a generated
ML-1M-schema data set (NOT real data, ``dnr_jax.data.samples``). Configs ``100k`` and
``1m`` read the official zip files (``ml-100k.zip``: ``u.data``, ``u.user``, ``u.item``;
``ml-1m.zip``: ``ratings.dat``, ``users.dat``, ``movies.dat``, latin-1 text), from a
source directory or downloaded (``download=True``); the archive's md5 is checked.
Splits: ``log`` (ratings), ``users``, ``movies``. ``log_stream`` (and
``to_interactions``, which loads it whole) labels a rating positive when it is at
least ``threshold`` (4 by default).

Not to be confused with TFDS's own ``movielens`` data set: this builder is not
registered with TFDS and keeps its files under ``dnr_jax``'s data directory.
"""

from __future__ import annotations

import numpy as np

from dnr_jax.data import ratings
from dnr_jax.data import raw
from dnr_jax.data import stream
from dnr_jax.data import types
from dnr_jax.data.csv_reader import Column, FileSpec

HOMEPAGE = "https://grouplens.org/datasets/movielens/"
_URL = "https://files.grouplens.org/datasets/movielens/{}"
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
USER_FEATURES = ("gender", "age", "occupation")

_RATING = (Column("user_id", dtype="int32", min=1),
           Column("movie_id", dtype="int32", min=1),
           Column("rating", dtype="int8", min=1, max=5),
           Column("timestamp", dtype="int64", min=0))
_LOG_NAMES = ("user_id", "movie_id", "rating", "timestamp")
LOG_COLUMNS = ratings.LogColumns(user="user_id", item="movie_id", rating="rating",
                                 time="timestamp")


def _tables_100k():
  latin = dict(encoding="latin-1", header=False, quoting=False)
  return (
      raw.Table("log", ("u.data",), _RATING,
                spec=FileSpec(delimiter="\t", header=False, names=_LOG_NAMES)),
      raw.Table("users", ("u.user",), (Column("user_id", dtype="int32", min=1),),
                categorical=USER_FEATURES,
                spec=FileSpec(delimiter="|", names=("user_id", "age", "gender",
                                                    "occupation", "zip_code"), **latin)),
      raw.Table("movies", ("u.item",), (Column("movie_id", dtype="int32", min=1),) +
                tuple(Column(f"genre_{g}", dtype="int8", min=0, max=1) for g in GENRES),
                spec=FileSpec(delimiter="|", names=(
                    "movie_id", "title", "release_date", "video_release_date",
                    "imdb_url") + tuple(f"genre_{g}" for g in GENRES), **latin)),
  )


def _tables_1m():
  latin = dict(delimiter="::", encoding="latin-1", header=False, quoting=False)
  return (
      raw.Table("log", ("ratings.dat",), _RATING,
                spec=FileSpec(delimiter="::", header=False, names=_LOG_NAMES)),
      raw.Table("users", ("users.dat",), (Column("user_id", dtype="int32", min=1),),
                categorical=USER_FEATURES,
                spec=FileSpec(names=("user_id", "gender", "age", "occupation",
                                     "zip_code"), **latin)),
      raw.Table("movies", ("movies.dat",), (Column("movie_id", dtype="int32", min=1),),
                categorical=("genres",),
                spec=FileSpec(names=("movie_id", "title", "genres"), **latin)),
  )


CONFIGS = {
    "100k": raw.RawConfig(
        name="100k", description="MovieLens 100k: 943 users, 1,682 movies.",
        tables=_tables_100k(), archive="ml-100k.zip",
        md5="0e33842e24a9c977be4e0107933c0723", url=_URL.format("ml-100k.zip"),
        homepage=HOMEPAGE),
    "1m": raw.RawConfig(
        name="1m", description="MovieLens 1M: 6,040 users, 3,706 movies (the paper's).",
        tables=_tables_1m(), archive="ml-1m.zip",
        md5="c4d9eecfca2ab87c1945afe126590906", url=_URL.format("ml-1m.zip"),
        homepage=HOMEPAGE),
    "sample": raw.RawConfig(
        name="sample", tables=_tables_1m(), homepage=HOMEPAGE, is_sample=True,
        description="Generated MovieLens-1M-schema sample: NOT real data."),
}


class Movielens(raw.RawBuilder, skip_registration=True):
  """MovieLens ratings, users and movies, prepared from the official zip files."""

  BUILDER_CONFIGS = list(CONFIGS.values())


def log_stream(builder: Movielens, threshold: int = 4) -> stream.LogStream:
  """The prepared ratings as a ``stream.LogStream``: label = rating >= ``threshold``."""
  ratings.check_threshold(threshold)
  meta = builder.info.metadata
  users = raw.read_table(builder, "users")
  movies = raw.read_table(builder, "movies")
  if "genres" in movies:            # 1m: the genre list as one category
    item_cols, item_vocab = ("genres",), (len(meta["movies_vocab"]["genres"]) + 1,)
  else:                             # 100k: the first genre flag set
    flags = np.stack([movies[f"genre_{g}"] for g in GENRES], 1)
    movies = {"movie_id": movies["movie_id"],
              "genre": np.where(flags.any(1), flags.argmax(1) + 1, 0).astype(np.int32)}
    item_cols, item_vocab = ("genre",), (len(GENRES) + 1,)
  return ratings.log_stream(
      builder, LOG_COLUMNS, threshold, f"MovieLens-{builder.builder_config.name}",
      user_features=lambda ids: raw.feature_table(users, "user_id", ids, USER_FEATURES),
      item_features=lambda ids: raw.feature_table(movies, "movie_id", ids, item_cols),
      user_feature_vocab=tuple(len(meta["users_vocab"][c]) + 1 for c in USER_FEATURES),
      item_feature_vocab=item_vocab)


def to_interactions(builder: Movielens, threshold: int = 4) -> types.Interactions:
  """The whole prepared ratings log in memory (``log_stream(...).load()``)."""
  return log_stream(builder, threshold).load()
