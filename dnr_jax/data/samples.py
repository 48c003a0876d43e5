"""Generated data sets in the exact schema of the real files (NOT real data).

The real KuaiRand, MovieLens and Amazon files cannot ship with the project, so the
demos, tests and benchmark run on generated files with the same names, columns, types
and layout, read by the same builders. Every generated directory holds a
``NOT_REAL_DATA`` marker, so the builders, the logs and the results tables say that
the data is generated.

The log has a *planted* truth, so the reranking task is learnable and a retriever's
scores are informative but noisy: users and items have latent vectors (items in taste
clusters); the production feed shows a user mostly items of their preferred clusters,
and a click happens with probability ``sigmoid(sharpness * <u, v> + item bias + c)``.
An MF retriever trained on the early clicks recovers part of ``<u, v>``: its scores
rank clicks above skips (AUC > 0.5), with estimation noise.

Generation is vectorised and streamed in chunks of users, so a 10M-row
KuaiRand-27K-schema log (``benchmarks/prepare_27k.py``) takes under a minute and little
memory.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from dnr_jax.data import raw

# 2022-04-08 00:00 and 2022-05-09 00:00, Beijing time (UTC+8), in ms since the epoch.
_START_MS = 1649347200000
_SPLIT_MS = 1650556800000   # 2022-04-22 00:00: the standard logs' two periods
_END_MS = 1652025600000
_DAY_MS = 86_400_000
_TZ_MS = 8 * 3_600_000

_ACTIVE = np.array(["high_active", "full_active", "middle_active", "UNKNOWN"])
_FOLLOW = np.array(["0", "(0,10]", "(10,50]", "(50,100]", "(100,150]", "(150,250]",
                    "(250,500]", "500+"])
_FANS = np.array(["0", "[1,10)", "[10,100)", "[100,1k)", "[1k,5k)", "[5k,1w)",
                  "[1w,10w)"])
_FRIEND = np.array(["0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+"])
_REGISTER = np.array(["15-30", "31-60", "61-90", "91-180", "181-365", "366-730", "730+"])
# Documented ranges of onehot_feat0..17 (max value of each).
_ONEHOT_MAX = (1, 6, 49, 1470, 14, 33, 2, 117, 453, 6, 4, 4, 1, 1, 1, 1, 1, 1)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Size and truth of a generated log."""
  num_users: int = 1000
  num_items: int = 800
  rows_per_user: int = 160      # mean standard-log impressions per user (the month)
  random_rows_per_user: int = 4  # KuaiRand's random-exposure log
  latent_dim: int = 8
  num_clusters: int = 16
  focus: float = 0.8            # share of a user's feed from their preferred clusters
  sharpness: float = 3.0        # how much <u, v> decides a click
  click_bias: float = -2.0      # sets the click rate (about 0.4)
  seed: int = 0


class _World:
  """The planted truth: latent vectors, clusters, biases."""

  def __init__(self, c: SampleConfig):
    rng = np.random.default_rng(c.seed)
    centres = rng.normal(size=(c.num_clusters, c.latent_dim))
    self.cluster = np.sort(rng.integers(0, c.num_clusters, c.num_items))
    self.item_vec = (centres[self.cluster]
                     + 0.7 * rng.normal(size=(c.num_items, c.latent_dim))) / np.sqrt(
                         c.latent_dim)
    self.item_bias = 0.5 * rng.normal(size=c.num_items)
    self.user_taste = rng.dirichlet(np.full(c.num_clusters, 0.3), c.num_users)
    self.user_vec = (self.user_taste @ centres
                     + 0.5 * rng.normal(size=(c.num_users, c.latent_dim))) / np.sqrt(
                         c.latent_dim)
    counts = np.bincount(self.cluster, minlength=c.num_clusters)
    self.cluster_start = np.r_[0, np.cumsum(counts)[:-1]]
    self.cluster_count = np.maximum(counts, 1)
    self.activity = rng.lognormal(0.0, 0.5, c.num_users)
    self.activity /= self.activity.mean()

  def feed(self, users, rng, c: SampleConfig):
    """Items the production feed shows ``users`` (one per entry)."""
    focused = rng.random(len(users)) < c.focus
    cdf = np.cumsum(self.user_taste[users], axis=1)
    cluster = (rng.random((len(users), 1)) > cdf).sum(1).clip(0, c.num_clusters - 1)
    within = (rng.random(len(users)) * self.cluster_count[cluster]).astype(np.int64)
    items = np.where(focused, self.cluster_start[cluster] + within,
                     rng.integers(0, c.num_items, len(users)))
    return items.clip(0, c.num_items - 1)

  def click_prob(self, users, items, c: SampleConfig):
    affinity = (self.user_vec[users] * self.item_vec[items]).sum(1)
    return 1 / (1 + np.exp(-(c.sharpness * affinity * np.sqrt(c.latent_dim)
                             + self.item_bias[items] + c.click_bias)))


def _write(path, columns: dict, header: bool):
  """Appends rows as the real files have them: bare header, quotes only if needed."""
  with open(path, "ab" if not header else "wb") as f:
    if header:
      f.write((",".join(columns) + "\n").encode())
    if any(isinstance(v, np.ndarray) and v.dtype.kind in "UO" for v in columns.values()):
      # Small feature tables with strings: the csv module quotes only what needs it.
      text = io.StringIO()
      writer = csv.writer(text, lineterminator="\n")
      cells = [v.to_pylist() if isinstance(v, pa.Array) else v.tolist()
               for v in columns.values()]
      writer.writerows(["" if x is None else x for x in row] for row in zip(*cells))
      f.write(text.getvalue().encode())
    else:   # numeric logs, millions of rows: pyarrow writes them fast
      pa_csv.write_csv(pa.table(columns), f, pa_csv.WriteOptions(include_header=False))


def _log_rows(world, users, times, items, rng, c, is_rand):
  n = len(users)
  p = world.click_prob(users, items, c)
  click = (rng.random(n) < p).astype(np.int64)
  duration = (5_000 + rng.gamma(2.0, 15_000, n)).astype(np.int64)
  watched = np.where(click == 1, rng.uniform(0.5, 1.6, n), rng.uniform(0.0, 0.4, n))
  play = (duration * watched).astype(np.int64)
  long_view = np.where(duration <= 18_000, play >= duration, play >= 18_000)
  rare = lambda rate: ((rng.random(n) < rate * p) & (click == 1)).astype(np.int64)
  local = times + _TZ_MS
  days = (local // _DAY_MS).astype("datetime64[D]")
  date = np.char.replace(np.datetime_as_string(days), "-", "").astype(np.int64)
  minute_of_day = (local % _DAY_MS) // 60_000
  profile_enter = rare(0.05)
  return {
      "user_id": users.astype(np.int64), "video_id": items.astype(np.int64),
      "date": date, "hourmin": (minute_of_day // 60) * 100 + minute_of_day % 60,
      "time_ms": times, "is_click": click, "is_like": rare(0.1),
      "is_follow": rare(0.01), "is_comment": rare(0.02), "is_forward": rare(0.01),
      "is_hate": ((rng.random(n) < 0.002) & (click == 0)).astype(np.int64),
      "long_view": long_view.astype(np.int64), "play_time_ms": play,
      "duration_ms": duration, "profile_stay_time": profile_enter * rng.integers(
          1_000, 60_000, n),
      "comment_stay_time": rare(0.05) * rng.integers(1_000, 60_000, n),
      "is_profile_enter": profile_enter, "is_rand": np.full(n, is_rand, np.int64),
      "tab": rng.choice(15, n, p=_TAB_P),
  }


_TAB_P = np.r_[0.3, 0.4, 0.1, np.full(12, 0.2 / 12)]


def write_kuairand(directory: str, config: SampleConfig = SampleConfig(),
                   variant: str = "pure", users_per_chunk: int = 2000) -> str:
  """Writes a KuaiRand-``variant``-schema data set; returns its ``data`` directory.

  Files (as in the official archives; the unused ``video_features_statistic_*`` file
  is left out): ``log_standard_4_08_to_4_21_*``, ``log_standard_4_22_to_5_08_*``
  (``_part1``/``_part2`` for ``27k``), ``log_random_4_22_to_5_08_*``,
  ``user_features_*``, ``video_features_basic_*``.
  """
  from dnr_jax.data import kuairand  # pylint: disable=g-import-not-at-top
  if variant not in ("pure", "1k", "27k"):
    raise ValueError(f"variant={variant!r} must be pure, 1k or 27k")
  cfg = kuairand.CONFIGS[variant]
  log_files = cfg.tables[0].files
  folder = {"pure": "KuaiRand-Pure", "1k": "KuaiRand-1K", "27k": "KuaiRand-27K"}[variant]
  data = _generated_folder(os.path.join(directory, folder, "data"), "KuaiRand")
  world = _World(config)
  rng = np.random.default_rng(config.seed + 1)
  standard = [f for f in log_files if "standard" in f]
  written = set()
  for start in range(0, config.num_users, users_per_chunk):
    users = np.arange(start, min(start + users_per_chunk, config.num_users))
    counts = rng.poisson(config.rows_per_user * world.activity[users])
    u = np.repeat(users, counts)
    t = rng.integers(_START_MS, _END_MS, len(u))
    order = np.lexsort((t, u))
    u, t = u[order], t[order]
    rows = _log_rows(world, u, t, world.feed(u, rng, config), rng, config, 0)
    first_period = t < _SPLIT_MS
    part = (start // users_per_chunk) % 2   # 27k: chunks alternate between parts
    for period, sel in (("4_08_to_4_21", first_period), ("4_22_to_5_08", ~first_period)):
      names = [f for f in standard if period in f]
      name = names[part % len(names)]
      _write(os.path.join(data, name), {k: v[sel] for k, v in rows.items()},
             header=name not in written)
      written.add(name)
    # Random exposures: uniform items in the second period.
    rc = rng.poisson(config.random_rows_per_user, len(users))
    ru = np.repeat(users, rc)
    rt = np.sort(rng.integers(_SPLIT_MS, _END_MS, len(ru)))
    rnd = _log_rows(world, ru, rt, rng.integers(0, config.num_items, len(ru)), rng,
                    config, 1)
    name = log_files[-1]
    _write(os.path.join(data, name), rnd, header=name not in written)
    written.add(name)
  _write_kuairand_users(os.path.join(data, cfg.tables[1].files[0]), world, config, rng)
  _write_kuairand_videos(os.path.join(data, cfg.tables[2].files[0]), world, config, rng)
  return data


def _write_kuairand_users(path, world, c, rng):
  n = c.num_users
  follow = rng.integers(0, len(_FOLLOW), n)
  fans = rng.integers(0, len(_FANS), n)
  friend = rng.integers(0, len(_FRIEND), n)
  register = rng.integers(0, len(_REGISTER), n)
  cols = {
      "user_id": np.arange(n),
      # Activity and taste leak into some features, as real profiles would.
      "user_active_degree": _ACTIVE[np.clip(3 - (world.activity * 1.5).astype(int),
                                            0, 3)],
      "is_lowactive_period": (rng.random(n) < 0.05).astype(np.int64),
      "is_live_streamer": (rng.random(n) < 0.02).astype(np.int64),
      "is_video_author": (rng.random(n) < 0.3).astype(np.int64),
      "follow_user_num": follow * 20 + rng.integers(0, 20, n),
      "follow_user_num_range": _FOLLOW[follow],
      "fans_user_num": fans * 30 + rng.integers(0, 30, n),
      "fans_user_num_range": _FANS[fans],
      "friend_user_num": friend * 5 + rng.integers(0, 5, n),
      "friend_user_num_range": _FRIEND[friend],
      "register_days": (register + 1) * 100 + rng.integers(0, 100, n),
      "register_days_range": _REGISTER[register],
  }
  for i, hi in enumerate(_ONEHOT_MAX):
    cols[f"onehot_feat{i}"] = (world.user_taste.argmax(1) % (hi + 1) if i == 1
                               else rng.integers(0, hi + 1, n))
  _write(path, cols, header=True)


def _write_kuairand_videos(path, world, c, rng):
  n = c.num_items
  duration = (5_000 + rng.gamma(2.0, 15_000, n)).round(-2)
  duration_col = pa.array(duration, pa.float64(), mask=rng.random(n) < 0.01)
  tags = np.array([f"{k}" if k % 3 else f"{k},{(k * 7) % 60}" for k in world.cluster])
  _write(path, {
      "video_id": np.arange(n), "author_id": rng.integers(0, 8_839_734, n),
      "video_type": np.where(rng.random(n) < 0.97, "NORMAL", "AD"),
      "upload_dt": np.datetime_as_string(
          np.datetime64("2022-04-08") - rng.integers(0, 700, n).astype("timedelta64[D]")),
      "upload_type": rng.choice(["ShortImport", "LongImport", "Web", "ShortCamera"], n),
      "visible_status": np.where(rng.random(n) < 0.95, 1, 0),
      "video_duration": duration_col,
      "server_width": rng.choice([720, 1080, 576], n),
      "server_height": rng.choice([1280, 1920, 1024], n),
      "music_id": rng.integers(0, 10**9, n),
      "music_type": rng.choice([4, 8, 9, 11], n),
      "tag": tags,
  }, header=True)


def _generated_folder(folder: str, what: str) -> str:
  """``folder``, created, with the marker that says its files are generated."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, raw.NOT_REAL_MARKER), "w") as f:
    f.write(f"Generated by dnr_jax.data.samples: NOT the real {what} data.\n")
  return folder


def _choose_and_rate(world, c: SampleConfig, rng, counts):
  """``(users, items, ratings)``: user ``u`` rates ``counts[u]`` distinct items.

  People choose what they expect to like: each user's items are drawn without
  replacement with odds exp(sharpness * affinity + bias) (Gumbel top-k), so what a
  user rates carries their taste, as in MovieLens and Amazon; the rating is
  ``round(2.2 + 1.5 * affinity + bias + noise)`` clipped to 1..5. Users in order.
  """
  affinity_all = world.user_vec @ world.item_vec.T * np.sqrt(c.latent_dim)
  keys = (c.sharpness * affinity_all + world.item_bias
          + rng.gumbel(size=affinity_all.shape))
  ranked = np.argsort(-keys, axis=1)
  chosen = np.arange(c.num_items)[None, :] < counts[:, None]
  users = np.broadcast_to(np.arange(c.num_users)[:, None], ranked.shape)[chosen]
  items = ranked[chosen]
  rating = np.clip(np.round(2.2 + 1.5 * affinity_all[users, items]
                            + world.item_bias[items] + rng.normal(0, 0.8, len(users))),
                   1, 5).astype(int)
  return users, items, rating


_ML_OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer",
                   "entertainment", "executive", "healthcare", "homemaker", "lawyer",
                   "librarian", "marketing", "none", "other", "programmer", "retired",
                   "salesman", "scientist", "student", "technician", "writer")


def write_movielens(directory: str, config: SampleConfig = SampleConfig(
    num_users=300, num_items=400, rows_per_user=80), variant: str = "100k",
                    as_zip: bool = False) -> str:
  """Writes a MovieLens-``variant``-schema data set (``ml-100k/`` or ``ml-1m/``).

  Ratings follow the planted affinity (``round(2.2 + 1.5 * affinity + bias + noise)``
  clipped to 1..5) on distinct movies the user chose to watch, with odds that grow
  with the same affinity.
  ``as_zip`` also writes the ``ml-*.zip`` archive the builder would download.
  Returns the directory that holds the files.
  """
  if variant not in ("100k", "1m"):
    raise ValueError(f"variant={variant!r} must be 100k or 1m")
  from dnr_jax.data import movielens  # pylint: disable=g-import-not-at-top
  folder = _generated_folder(os.path.join(directory, f"ml-{variant}"), "MovieLens")
  world = _World(config)
  rng = np.random.default_rng(config.seed + 2)
  counts = np.clip(rng.poisson(config.rows_per_user * world.activity), 20,
                   config.num_items // 2)
  users, items, rating = _choose_and_rate(world, config, rng, counts)
  start = 874724710 if variant == "100k" else 956703932
  stamp = start + rng.integers(0, 200 * 86400, len(users))
  order = np.lexsort((stamp, users))
  uid, mid = users[order] + 1, items[order] + 1      # MovieLens ids start at 1
  rating, stamp = rating[order], stamp[order]
  n_u, n_i = config.num_users, config.num_items
  ages = rng.choice([1, 18, 25, 35, 45, 50, 56], n_u)
  gender = rng.choice(["M", "F"], n_u)
  occupation = rng.integers(0, len(_ML_OCCUPATIONS), n_u)
  genre = 1 + world.cluster % (len(movielens.GENRES) - 1)   # no "unknown"
  names = [f"Movie {i + 1} ({1930 + (i * 7) % 70})" for i in range(n_i)]
  lines = {}
  if variant == "100k":
    lines["u.data"] = [f"{u}\t{m}\t{r}\t{t}" for u, m, r, t in zip(uid, mid, rating, stamp)]
    lines["u.user"] = [f"{u + 1}|{ages[u] + rng.integers(0, 5)}|{gender[u]}|"
                       f"{_ML_OCCUPATIONS[occupation[u]]}|{10000 + u}" for u in range(n_u)]
    lines["u.item"] = [
        f"{i + 1}|{names[i]}|01-Jan-{1930 + (i * 7) % 70}||http://example.invalid/{i}|" +
        "|".join("1" if g == genre[i] else "0" for g in range(len(movielens.GENRES)))
        for i in range(n_i)]
  else:
    lines["ratings.dat"] = [f"{u}::{m}::{r}::{t}"
                            for u, m, r, t in zip(uid, mid, rating, stamp)]
    lines["users.dat"] = [f"{u + 1}::{gender[u]}::{ages[u]}::{occupation[u]}::{10000 + u}"
                          for u in range(n_u)]
    lines["movies.dat"] = [
        f"{i + 1}::{names[i]}::{movielens.GENRES[genre[i]]}" +
        (f"|{movielens.GENRES[(genre[i] + 3) % len(movielens.GENRES)]}" if i % 4 == 0
         else "") for i in range(n_i)]
  for name, rows in lines.items():
    with open(os.path.join(folder, name), "w", encoding="latin-1") as f:
      f.write("\n".join(rows) + "\n")
  if as_zip:
    with zipfile.ZipFile(os.path.join(directory, f"ml-{variant}.zip"), "w") as z:
      for name in list(lines) + [raw.NOT_REAL_MARKER]:
        z.write(os.path.join(folder, name), f"ml-{variant}/{name}")
  return folder


_BOOK_FORMATS = ("Hardcover", "Paperback", "Kindle Edition", "Mass Market Paperback")
_ALNUM = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def _asins(n: int, rng) -> list[str]:
  """Book ASINs: ISBN-10s (leading zeros kept, check digit 0-9 or X), some B0 ids."""
  bodies = [f"{b:09d}" for b in rng.choice(10**9, n, replace=False)]
  return ["B0" + "".join(rng.choice(_ALNUM, 8)) if i % 10 == 9 else
          d + "0123456789X"[-sum((10 - k) * int(c) for k, c in enumerate(d)) % 11]
          for i, d in enumerate(bodies)]


def write_amazon_books(directory: str, config: SampleConfig = SampleConfig(
    num_users=400, num_items=300, rows_per_user=40), gzipped: bool = True) -> str:
  """Writes the Amazon-Books files (2018 release) into ``directory/Books``; returns it.

  ``Books.csv``: every rating, ``asin,reviewerID,5.0,unixReviewTime`` (no header);
  ``Books_5.json.gz`` (``gzipped=False``: ``Books_5.json``): the 5-core of those
  ratings, one review object a line with the release's fields (``vote`` and
  ``image`` on some; generated text). Ratings as ``write_movielens``'s; a sixth of
  the users rate 1-4 books only and fall out of the 5-core. Times are midnights
  (UTC), as the release's; rows grouped by book.
  """
  from dnr_jax.data import amazon_books, preprocess  # pylint: disable=g-import-not-at-top
  folder = _generated_folder(os.path.join(directory, "Books"), "Amazon review")
  world = _World(config)
  rng = np.random.default_rng(config.seed + 3)
  counts = np.clip(rng.poisson(config.rows_per_user * world.activity), 5,
                   config.num_items // 2)
  occasional = rng.random(config.num_users) < 1 / 6
  counts[occasional] = rng.integers(1, 5, occasional.sum())
  users, items, rating = _choose_and_rate(world, config, rng, counts)
  day = 15340 + rng.integers(0, 2465, len(users))    # 2012-01-01 .. 2018-10-01
  order = np.lexsort((day, items))
  users, items, rating, stamp = users[order], items[order], rating[order], day[order]
  stamp = stamp * 86400
  reviewer = ["A" + "".join(rng.choice(_ALNUM, 13)) for _ in range(config.num_users)]
  asin = _asins(config.num_items, rng)
  with open(os.path.join(folder, amazon_books.RATINGS_FILE), "w") as f:
    f.writelines(f"{asin[i]},{reviewer[u]},{r:.1f},{t}\n"
                 for u, i, r, t in zip(users, items, rating, stamp))

  def count(keep_u, keep_i):
    m = preprocess.keep_mask(keep_u, users) & preprocess.keep_mask(keep_i, items)
    return (np.bincount(users[m], minlength=config.num_users),
            np.bincount(items[m], minlength=config.num_items))

  keep_u, keep_i = preprocess.k_core_ids(count, 5, "the generated Books ratings")
  name = amazon_books.REVIEWS_FILE if gzipped else amazon_books.REVIEWS_FILE[:-3]
  with (gzip.open if gzipped else open)(os.path.join(folder, name), "wt") as f:
    for u, i, r, t in zip(users, items, rating, stamp):
      if not (keep_u[u] and keep_i[i]):
        continue
      date = np.datetime64(int(t), "s").astype(object)
      review = {"overall": float(r), "verified": bool(rng.random() < 0.7),
                "reviewTime": f"{date.month:02d} {date.day}, {date.year}",
                "reviewerID": reviewer[u], "asin": asin[i],
                "style": {"Format:": _BOOK_FORMATS[(i + u) % len(_BOOK_FORMATS)]},
                "reviewerName": f"Reader {u}", "reviewText": (
                    f"Generated review text ({r} stars): NOT a real review."),
                "summary": f"{r} stars", "unixReviewTime": int(t)}
      if rng.random() < 0.2:
        review = {"overall": review.pop("overall"), "vote": f"{rng.integers(2, 2000):,}",
                  **review}
      if rng.random() < 0.05:
        review = {"image": [f"https://images.example.invalid/{u}-{i}.jpg"], **review}
      if rng.random() < 0.03:
        del review["reviewText"]
      f.write(json.dumps(review) + "\n")
  return folder
