"""Data integrity: cut-off and empty files, changed sources, killed preparations."""

import fcntl
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dnr_jax.data import csv_reader, integrity, lists, movielens, prepare, raw
from dnr_jax.data import retriever, samples
from dnr_jax.errors import DataError
from dnr_jax.data.csv_reader import Column, FileSpec

tfds.disable_progress_bar()
ML_TINY = samples.SampleConfig(num_users=40, num_items=60, rows_per_user=30)
_RATINGS = FileSpec(delimiter="::", header=False,
                    names=("user_id", "movie_id", "rating", "timestamp"))


def _ml1m(tmp_path):
  folder = samples.write_movielens(str(tmp_path / "src"), ML_TINY, "1m")
  return tmp_path / "src", os.path.join(folder, "ratings.dat")


def _builder(source, tmp_path):
  return movielens.Movielens(config="1m", data_dir=str(tmp_path / "tfds"),
                             source_dir=str(source))


def test_a_cut_off_last_line_that_still_parses_is_rejected(tmp_path):
  # The case: "60::14::2::978300760" cut to "60::14::2::9" is a valid rating
  # from 1970; only the missing line end shows the file is incomplete.
  path = tmp_path / "ratings.dat"
  path.write_text("1::10::4::978300760\n60::14::2::9")
  with pytest.raises(DataError) as e:
    list(csv_reader.iter_chunks(str(path), movielens._RATING, _RATINGS))
  assert str(e.value) == (f"{path}: line 2: the last line has no line end "
                          "('60::14::2::9'): the file looks cut off; fetch it again "
                          "(or, if it is complete, end it with a newline)")
  path.write_text("1::10::4::978300760\n60::14::2::978300760\n")     # complete: fine
  rows = list(csv_reader.iter_chunks(str(path), movielens._RATING, _RATINGS))
  np.testing.assert_array_equal(rows[0][0]["user_id"], [1, 60])


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_cut_off_line_is_found_whatever_the_chunking(tmp_path, chunk_bytes):
  path = tmp_path / "x.csv"
  path.write_text("a,b\n" + "".join(f"{i},{i}\n" for i in range(50)) + "50,5")
  with pytest.raises(DataError, match=r"x.csv: line 52: the last line has no line end"):
    list(csv_reader.iter_chunks(str(path), [Column("a"), Column("b")],
                                chunk_bytes=chunk_bytes))


def test_cut_off_ratings_file_fails_the_builder_naming_it(tmp_path):
  source, ratings = _ml1m(tmp_path)
  with open(ratings, "rb+") as f:
    f.truncate(os.path.getsize(ratings) - 4)      # inside the last timestamp
  builder = _builder(source, tmp_path)
  with pytest.raises(DataError, match=r"ratings.dat: line \d+: the last line has no "
                     "line end"):
    raw.prepare(builder)
  assert not _builder(source, tmp_path).is_prepared()


def test_empty_ratings_file_is_named(tmp_path):
  # Was a TFDS AssertionError naming no file.
  source, ratings = _ml1m(tmp_path)
  open(ratings, "w").close()
  with pytest.raises(DataError) as e:
    raw.prepare(_builder(source, tmp_path))
  assert str(e.value) == f"{ratings}: no data rows: the file is empty"


def test_header_only_file_is_named(tmp_path):
  path = tmp_path / "x.csv"
  path.write_text("a,b\n")
  table = raw.Table("t", ("x.csv",), (Column("a"), Column("b")))
  builder = _builder(tmp_path, tmp_path)
  with pytest.raises(DataError, match=r"x.csv: no data rows: the file is empty but "
                     "for its header"):
    list(builder._generate_examples(table, {"x.csv": str(path)}))


def test_missing_files_are_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError) as e:
    raw.prepare(_builder(tmp_path / "empty", tmp_path))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("movielens/1m: missing source file(s) movies.dat, ratings.dat, "
                        "users.dat; to fix: put the archive ml-1m.zip")


def test_a_changed_source_is_prepared_again(tmp_path, caplog):
  source, ratings = _ml1m(tmp_path)
  first = raw.prepare(_builder(source, tmp_path))
  rows = first.info.metadata["log_rows"]
  # The same files: reused, not prepared again.
  again = _builder(source, tmp_path)
  assert again.is_prepared() and raw.prepare(again).info.metadata["log_rows"] == rows
  lines = open(ratings).read().splitlines(keepends=True)
  with open(ratings, "w") as f:
    f.writelines(lines[:-3])
  with caplog.at_level("WARNING"):
    changed = raw.prepare(_builder(source, tmp_path))
  assert changed.info.metadata["log_rows"] == rows - 3
  assert "the source files changed since it was prepared (ratings.dat: " in caplog.text
  # A deleted source is not a change: the prepared copy stays in use.
  os.remove(ratings)
  assert raw.prepare(_builder(source, tmp_path)).info.metadata["log_rows"] == rows - 3


def test_fingerprint_changes():
  before = {"a.csv": [10, 1_000_000_000], "b.csv": [5, 7]}
  assert integrity.changes(before, dict(before)) == []
  assert integrity.changes(before, {"a.csv": [11, 1_000_000_000]}) == [
      "a.csv: 10 -> 11 bytes"]
  assert integrity.changes(before, {"a.csv": [10, 2_000_000_000]}) == [
      "a.csv: modified 1970-01-01 00:00:02 UTC (was 1970-01-01 00:00:01 UTC)"]
  assert integrity.changes(before, {}) == []            # deleted: not a change
  assert integrity.changes(None, {"a.csv": [1, 1]})     # no record: prepare again


def test_preparation_deletes_what_killed_ones_left(tmp_path):
  folder = tmp_path / "ds" / "cfg"
  (folder / "incomplete.AB12CD_1.0.0" / "sub").mkdir(parents=True)
  (folder / "incomplete.spill").mkdir()
  (folder / "1.0.0").mkdir()
  with integrity.preparing(str(folder), "ds/cfg"):
    assert sorted(os.listdir(folder)) == [integrity.LOCK_FILE, "1.0.0"]
    # Held: another preparation of the same data set waits (flock is per open file).
    with open(folder / integrity.LOCK_FILE) as other:
      with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  with open(folder / integrity.LOCK_FILE) as other:      # released on exit
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _lists_config(source, tmp_path):
  return prepare.default_config(
      "movielens", "1m", source_dir=str(source), data_dir=str(tmp_path / "d"),
      k_core=3, retriever=retriever.RetrieverConfig(dim=4, epochs=1, batch_size=256),
      lists=lists.ListConfig(protocol="retrieval", list_size=5, history_size=4,
                             window=2, min_list_size=2))


def test_lists_are_prepared_again_when_a_source_changes(tmp_path, monkeypatch):
  source, ratings = _ml1m(tmp_path)
  config = _lists_config(source, tmp_path)
  # A killed earlier preparation left its spill and a TFDS temporary folder.
  name = f"movielens-1m-{prepare.cache_key(config)}"
  folder = tmp_path / "d" / "dnr_lists" / name
  (folder / "incomplete.spill").mkdir(parents=True)
  (folder / "incomplete.QWERTY_2.1.0").mkdir()
  first = prepare.prepare_lists(config)
  assert sorted(os.listdir(folder)) == [integrity.LOCK_FILE, prepare.LISTS_VERSION]
  real_build = prepare.build
  monkeypatch.setattr(prepare, "build", lambda *a: pytest.fail("rebuilt"))
  prepare.prepare_lists(config)                       # unchanged: the cache
  lines = open(ratings).read().splitlines(keepends=True)
  with open(ratings, "w") as f:
    f.writelines(lines[:-20])
  calls = []
  monkeypatch.setattr(prepare, "build", lambda *a: calls.append(1) or real_build(*a))
  second = prepare.prepare_lists(config)
  assert calls == [1]
  assert second.report["rows"] < first.report["rows"]



def test_unlocked_leftovers_are_deleted_a_day_later(tmp_path):
  old, fresh = tmp_path / "incomplete.abc", tmp_path / "incomplete.new"
  old.mkdir()
  fresh.mkdir()
  day_ago = os.path.getmtime(old) - 86401
  os.utime(old, (day_ago, day_ago))
  assert integrity.remove_old(str(tmp_path), integrity.INCOMPLETE_PREFIX) == [str(old)]
  assert fresh.exists() and not old.exists()        # may be in use: kept


def test_a_killed_sample_generation_is_generated_again(tmp_path, monkeypatch):
  config = prepare.default_config("movielens", "sample", data_dir=str(tmp_path),
                                  sample=ML_TINY)
  real = samples.write_movielens

  def killed(directory, *args, **kwargs):
    real(directory, *args, **kwargs)
    raise KeyboardInterrupt("killed")               # files (and marker) written

  monkeypatch.setattr(samples, "write_movielens", killed)
  with pytest.raises(KeyboardInterrupt):
    prepare.raw_builder(config)
  manual = tmp_path / "manual"
  assert [p.name.startswith("incomplete.") for p in manual.iterdir()] == [True]
  monkeypatch.setattr(samples, "write_movielens", real)
  builder = prepare.raw_builder(config)
  assert raw.find_files(builder.source_dir, [raw.NOT_REAL_MARKER])
  assert builder.source_dir.startswith(str(manual / "movielens-sample-"))


def _can_lock(folder, mode) -> bool:
  """Whether another open file (as another process would) gets ``mode`` on it now."""
  with open(os.path.join(folder, integrity.LOCK_FILE)) as other:
    try:
      fcntl.flock(other, mode | fcntl.LOCK_NB)
    except BlockingIOError:
      return False
    fcntl.flock(other, fcntl.LOCK_UN)
    return True


def test_readers_share_the_lock_and_keep_preparations_out(tmp_path):
  folder = str(tmp_path / "ds" / "cfg")
  with integrity.reading(folder, "ds/cfg"):
    assert _can_lock(folder, fcntl.LOCK_SH)          # readers do not wait for each other
    assert not _can_lock(folder, fcntl.LOCK_EX)      # a re-preparation waits
    with integrity.reading(folder, "ds/cfg"):        # re-entrant in one process
      pass
    with pytest.raises(RuntimeError, match="cannot prepare while this process reads"):
      with integrity.preparing(folder, "ds/cfg"):
        pass
  with integrity.preparing(folder, "ds/cfg"):
    assert not _can_lock(folder, fcntl.LOCK_SH)      # nobody reads a half-prepared set
    with integrity.preparing(folder, "ds/cfg"), integrity.reading(folder, "ds/cfg"):
      pass                                           # re-entrant under the exclusive one
  assert _can_lock(folder, fcntl.LOCK_EX)            # all released


def test_lists_and_the_raw_log_are_read_under_the_shared_lock(tmp_path, monkeypatch):
  source, _ = _ml1m(tmp_path)
  config = _lists_config(source, tmp_path)
  raw_folder = os.path.dirname(prepare.raw_builder(config).data_dir)
  lists_folder = os.path.dirname(prepare.DnrLists(data_config=config).data_dir)
  seen = []
  real_build, real_load = prepare._build, prepare.load_splits  # pylint: disable=protected-access

  def build(*a):
    # While lists are built from the raw log, the raw data set cannot be deleted.
    seen.append(("build", _can_lock(raw_folder, fcntl.LOCK_SH),
                 _can_lock(raw_folder, fcntl.LOCK_EX)))
    return real_build(*a)

  def load(*a, **k):
    seen.append(("load", _can_lock(lists_folder, fcntl.LOCK_SH),
                 _can_lock(lists_folder, fcntl.LOCK_EX)))
    return real_load(*a, **k)

  monkeypatch.setattr(prepare, "_build", build)
  monkeypatch.setattr(prepare, "load_splits", load)
  prepare.prepare_lists(config)          # prepared, then loaded
  prepare.prepare_lists(config)          # from the cache
  assert seen == [("build", True, False), ("load", True, False), ("load", True, False)]
