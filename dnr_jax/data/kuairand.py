"""KuaiRand (Gao et al., CIKM 2022) as a TFDS data set, and its interaction log.

Configs ``pure``, ``1k`` and ``27k`` are the official releases (Zenodo record
10439422); ``sample`` is the generated KuaiRand-Pure-schema sample of
``dnr_jax.data.samples`` (the embedded demo: NOT the real data). Splits:

* ``log``: ``log_standard_*`` files then ``log_random_*``, every documented column;
* ``users``: ``user_features_*`` (categorical columns as codes);
* ``videos``: ``video_features_basic_*`` (categorical columns as codes).

``log_stream`` reads the prepared log as the stream of cleaned blocks the list
preparation passes over (``dnr_jax.data.stream``), with the label chosen by config
(``is_click`` by default, ``long_view`` as an option; open point 7 of the paper
note); ``to_interactions`` loads it whole, for logs that fit in memory.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from dnr_jax.data import raw
from dnr_jax.data import stream
from dnr_jax.data import types
from dnr_jax.data.csv_reader import Column

HOMEPAGE = "https://zenodo.org/records/10439422"
_URL = "https://zenodo.org/records/10439422/files/{}?download=1"
LABELS = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward",
          "is_profile_enter")


def _flag(name):
  return Column(name, dtype="int8", min=0, max=1)


LOG_COLUMNS = (
    Column("user_id", dtype="int32", min=0),
    Column("video_id", dtype="int32", min=0),
    Column("date", dtype="int32", min=20000101, max=21000101),
    Column("hourmin", dtype="int16", min=0, max=2400),
    Column("time_ms", dtype="int64", min=0),
    _flag("is_click"), _flag("is_like"), _flag("is_follow"), _flag("is_comment"),
    _flag("is_forward"), _flag("is_hate"), _flag("long_view"),
    Column("play_time_ms", dtype="int64", min=0),
    Column("duration_ms", dtype="int64", min=0),
    Column("profile_stay_time", dtype="int64", min=0),
    Column("comment_stay_time", dtype="int64", min=0),
    _flag("is_profile_enter"), _flag("is_rand"),
    Column("tab", dtype="int8", min=0, max=14),
)
USER_FEATURES = (
    ("user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
     "follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
     "register_days_range") + tuple(f"onehot_feat{i}" for i in range(18)))
USER_NUMERIC = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
VIDEO_FEATURES = ("video_type", "upload_type", "visible_status", "music_type", "tag")


def _tables(suffix: str, standard: tuple[str, ...], random: tuple[str, ...]):
  log = raw.Table("log", standard + random, LOG_COLUMNS)
  users = raw.Table(
      "users", (f"user_features_{suffix}.csv",),
      (Column("user_id", dtype="int32", min=0),) + tuple(
          Column(c, nullable=True) for c in USER_NUMERIC),
      categorical=USER_FEATURES)
  # video_duration is a float with gaps in the real files, as are some ids.
  videos = raw.Table(
      "videos", (f"video_features_basic_{suffix}.csv",),
      (Column("video_id", dtype="int32", min=0),
       Column("author_id", nullable=True),
       Column("video_duration", kind="float", dtype="float32", nullable=True),
       Column("server_width", kind="float", dtype="float32", nullable=True),
       Column("server_height", kind="float", dtype="float32", nullable=True),
       Column("music_id", nullable=True)),
      categorical=VIDEO_FEATURES)
  return (log, users, videos)


def _standard(suffix, parts=None):
  if parts:
    return tuple(f"log_standard_{period}_{suffix}_part{p}.csv"
                 for period in ("4_08_to_4_21", "4_22_to_5_08") for p in parts)
  return (f"log_standard_4_08_to_4_21_{suffix}.csv",
          f"log_standard_4_22_to_5_08_{suffix}.csv")


def _config(name, archive, md5, suffix, parts=None, is_sample=False, description=""):
  return raw.RawConfig(
      name=name, description=description,
      tables=_tables(suffix, _standard(suffix, parts),
                     (f"log_random_4_22_to_5_08_{suffix}.csv",)),
      archive=archive, md5=md5, url=_URL.format(archive) if archive else None,
      homepage=HOMEPAGE, is_sample=is_sample)


CONFIGS = {
    "pure": _config("pure", "KuaiRand-Pure.tar.gz", "0820331067a3784d9691136f772b35a7",
                    "pure", description="KuaiRand-Pure: 27,285 users, 7,583 videos."),
    "1k": _config("1k", "KuaiRand-1K.tar.gz", "6b0b9c8222d67fcd4c676218edca3f1f", "1k",
                  description="KuaiRand-1K: 1,000 users, 4.4M videos, 11.8M rows."),
    "27k": _config("27k", "KuaiRand-27K.tar.gz", "3e3c799a24e2d23a4d2c757fbf9adf59",
                   "27k", parts=(1, 2),
                   description="KuaiRand-27K: 27,285 users, 32M videos, 322M rows."),
    "sample": _config("sample", None, None, "pure", is_sample=True,
                      description="Generated KuaiRand-Pure-schema sample: NOT real data."),
}


class Kuairand(raw.RawBuilder, skip_registration=True):
  """KuaiRand logs and features, prepared from the official CSV files."""

  BUILDER_CONFIGS = list(CONFIGS.values())


def log_stream(builder: Kuairand, label: str = "is_click",
               include_random: bool = False) -> stream.LogStream:
  """The prepared log as a ``stream.LogStream`` (blocks of raw ids, time, label).

  Args:
    builder: a prepared ``Kuairand`` builder.
    label: the binary feedback that counts as positive (``LABELS``).
    include_random: keep the randomly exposed impressions (``is_rand == 1``). Off by
      default: they are interventions, not the production feed the reranker reorders.
  """
  if label not in LABELS:
    raise ValueError(f"label={label!r} is not one of {LABELS}")
  source = builder.as_data_source(split="log")

  def read():
    for i in range(len(source)):
      b = source[i]["log"]
      keep = np.ones(len(b["user_id"]), bool) if include_random else b["is_rand"] == 0
      yield {"user": np.asarray(b["user_id"][keep], np.int64),
             "item": np.asarray(b["video_id"][keep], np.int64),
             "time": np.asarray(b["time_ms"][keep], np.int64),
             "label": np.asarray(b[label][keep], np.int8)}

  meta = builder.info.metadata
  is_real = bool(meta.get("is_real", True))
  name = f"KuaiRand-{builder.builder_config.name}"
  if not is_real:
    name += " (GENERATED sample, NOT the real data)"
  logging.info("%s: %d log rows (random exposures %s), label %s", name,
               meta.get("log_rows", -1), "kept" if include_random else "dropped", label)
  # Only the rows of the ids asked for: KuaiRand-27K describes 32M videos.
  return stream.LogStream(
      name=name, is_real=is_real, read=read, num_blocks=len(source),
      user_features=lambda ids: raw.feature_table(
          raw.read_table(builder, "users", where=("user_id", ids)), "user_id", ids,
          USER_FEATURES),
      item_features=lambda ids: raw.feature_table(
          raw.read_table(builder, "videos", where=("video_id", ids)), "video_id", ids,
          VIDEO_FEATURES),
      user_feature_vocab=tuple(len(meta["users_vocab"][c]) + 1 for c in USER_FEATURES),
      item_feature_vocab=tuple(len(meta["videos_vocab"][c]) + 1
                               for c in VIDEO_FEATURES))


def to_interactions(builder: Kuairand, label: str = "is_click",
                    include_random: bool = False) -> types.Interactions:
  """The whole prepared log in memory (``log_stream(...).load()``): time-sorted, dense
  ids, feature tables. For logs that fit in memory; list preparation streams."""
  return log_stream(builder, label, include_random).load()
