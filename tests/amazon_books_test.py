"""Amazon-Books: the release's two files, their readers, bad input, and the lists."""

import csv
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dnr_jax.data import amazon_books, id_vocab, json_reader, lists, prepare, raw
from dnr_jax.data import retriever, samples, stream
from dnr_jax.data.csv_reader import Column
from dnr_jax.errors import ConfigError, DataError

import child_env  # pylint: disable=g-bad-import-order  (tests/child_env.py)

tfds.disable_progress_bar()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = samples.SampleConfig(num_users=120, num_items=90, rows_per_user=30)
# The fields of the release's sample review (https://nijianmo.github.io/amazon/).
RELEASE_FIELDS = {"overall", "vote", "verified", "reviewTime", "reviewerID", "asin",
                  "style", "reviewerName", "reviewText", "summary", "unixReviewTime",
                  "image"}
WANTED = [Column("reviewerID", kind="str", dtype="object"),
          Column("asin", kind="str", dtype="object"),
          Column("overall", kind="float", dtype="float32", min=1, max=5),
          Column("unixReviewTime", dtype="int64", min=0)]


@pytest.fixture(scope="module")
def books(tmp_path_factory):
  """The generated release files, the 5-core gzipped as published."""
  return samples.write_amazon_books(str(tmp_path_factory.mktemp("books")), TINY)


def _reviews(folder):
  with gzip.open(os.path.join(folder, amazon_books.REVIEWS_FILE), "rt") as f:
    return [json.loads(line) for line in f]


def _ratings(folder):
  with open(os.path.join(folder, amazon_books.RATINGS_FILE)) as f:
    return list(csv.reader(f))


def _builder(source, tmp_path, config="books", chunk_bytes=64 << 20):
  return amazon_books.AmazonBooks(config=config, data_dir=str(tmp_path / "tfds"),
                                  source_dir=str(source), chunk_bytes=chunk_bytes)


def test_sample_has_the_release_schema(books):
  rows = _ratings(books)
  assert all(len(r) == 4 for r in rows)                 # item,user,rating,timestamp
  item, user, rating, stamp = rows[0]
  assert len(item) == 10 and user.startswith("A") and rating in {
      "1.0", "2.0", "3.0", "4.0", "5.0"} and int(stamp) % 86400 == 0
  assert any(r[0].startswith("0") for r in rows)       # ASINs keep leading zeros
  reviews = _reviews(books)
  assert all(set(r) <= RELEASE_FIELDS for r in reviews)
  assert all({"overall", "reviewerID", "asin", "unixReviewTime"} <= set(r)
             for r in reviews)
  assert any("vote" in r for r in reviews) and any("image" in r for r in reviews)
  assert any("reviewText" not in r for r in reviews)
  # The 5-core: every reviewer and book has >= 5 reviews, and all are ratings rows.
  for key in ("reviewerID", "asin"):
    assert min(np.unique([r[key] for r in reviews], return_counts=True)[1]) >= 5
  pairs = {(r[0], r[1], float(r[2]), int(r[3])) for r in rows}
  assert {(r["asin"], r["reviewerID"], r["overall"], r["unixReviewTime"])
          for r in reviews} <= pairs
  assert len(reviews) < len(rows)                      # some readers fall out


@pytest.mark.parametrize("config, gzipped", [("books", True), ("books", False),
                                             ("books_ratings", True)])
def test_both_files_prepare_with_string_ids_kept(tmp_path, config, gzipped):
  folder = samples.write_amazon_books(str(tmp_path / "src"), TINY, gzipped=gzipped)
  if not gzipped:
    assert os.path.exists(os.path.join(folder, "Books_5.json"))   # found decompressed
  # Small chunks: ids recur across chunks, and keep their codes.
  builder = raw.prepare(_builder(tmp_path / "src", tmp_path, config, 1 << 14))
  assert builder.info.metadata["is_real"] is False
  if config == "books":
    opener = gzip.open if gzipped else open
    name = amazon_books.REVIEWS_FILE if gzipped else "Books_5.json"
    with opener(os.path.join(folder, name), "rt") as f:
      expected = [(r["reviewerID"], r["asin"], r["overall"])
                  for r in map(json.loads, f)]
  else:
    expected = [(u, i, float(r)) for i, u, r, _ in _ratings(folder)]
  columns = amazon_books.SOURCES[builder.builder_config.tables[0].files[0]][0]
  log = raw.read_table(builder, "log")
  users = raw.read_ids(builder, "log", columns.user)[log[columns.user]]
  items = raw.read_ids(builder, "log", columns.item)[log[columns.item]]
  assert list(zip(users, items, log[columns.rating].tolist())) == expected
  interactions = amazon_books.log_stream(builder, threshold=4).load()
  assert interactions.num_rows == len(expected)
  assert interactions.label.sum() == sum(r >= 4 for _, _, r in expected)
  assert np.all(np.diff(interactions.time) >= 0)
  assert interactions.time[0] % 86_400_000 == 0         # midnights, in ms
  assert "NOT the real data" in interactions.name


def test_id_vocabulary_codes_by_first_appearance_across_chunks(tmp_path):
  path = str(tmp_path / id_vocab.file_name("log", "user"))
  with id_vocab.IdVocabulary(path, "test") as vocab:
    chunks = [vocab.encode(np.array(c, dtype=object)) for c in (
        ["b", "a", "b"], ["c", "a", "0012"], ["0012", "c"])]
    for k in range(100):                    # more arrays than are kept unmerged
      assert vocab.encode(np.array([f"x{k}", "a"], dtype=object)).tolist() == [5 + k, 2]
  assert [c.tolist() for c in chunks] == [[1, 2, 1], [3, 2, 4], [4, 3]]
  assert len(vocab) == 104
  ids = id_vocab.read_ids(str(tmp_path), "log", "user")
  assert ids[:6].tolist() == ["", "b", "a", "c", "0012", "x0"] and len(ids) == 105
  with pytest.raises(DataError, match=r"test: the id 'bad\\nid' holds a line break"):
    id_vocab.IdVocabulary(str(tmp_path / "bad.txt"), "test").encode(
        np.array(["ok", "bad\nid"], dtype=object))


def test_the_two_files_have_the_same_k_core(books, tmp_path):
  """The 20-core of the ratings is the 20-core of their 5-core (here k = 8)."""
  cores = []
  for config in ("books", "books_ratings"):
    builder = raw.prepare(_builder(books, tmp_path / config, config))
    vocab = stream.k_core(amazon_books.log_stream(builder), 8)
    columns = amazon_books.SOURCES[builder.builder_config.tables[0].files[0]][0]
    users = raw.read_ids(builder, "log", columns.user)[vocab.user_raw_id[1:]]
    items = raw.read_ids(builder, "log", columns.item)[vocab.item_raw_id[1:]]
    cores.append((vocab.rows, set(users), set(items)))
  assert cores[0] == cores[1] and cores[0][0] > 0


def _write(path, lines, gzipped):
  text = "".join(line + "\n" for line in lines)
  with (gzip.open if gzipped else open)(path, "wt") as f:
    f.write(text)
  return str(path)


def _review(**change):
  review = {"overall": 5.0, "verified": True, "reviewTime": "09 13, 2009",
            "reviewerID": "A2SUAM1J3GNN3B", "asin": "0000013714",
            "style": {"Format:": "Hardcover"}, "reviewerName": "J. McDonald",
            "reviewText": "Great purchase though!", "summary": "Heavenly Highway Hymns",
            "unixReviewTime": 1252800000}
  review.update(change)
  return json.dumps({k: v for k, v in review.items() if v is not None})


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("bad, message", [
    ('{"overall": 5.0, "reviewerID": "A1", "asin": "01"', "line 4: not a JSON object"),
    ("[1, 2]", "line 4: expected a JSON object, got list"),
    (_review(overall=None), "line 4, field 'overall': missing"),
    (_review(asin=None), "line 4, field 'asin': missing"),
    (_review(overall="five stars"), "line 4, field 'overall': expected a number, got "
     '"five stars"'),
    (_review(overall=6.0), "line 4, field 'overall': value 6.0 out of range [1, 5]"),
    (_review(overall=0), "line 4, field 'overall': value 0.0 out of range [1, 5]"),
    (_review(unixReviewTime=-5), "line 4, field 'unixReviewTime': value -5 out of range"),
    (_review(reviewerID=""), "line 4, field 'reviewerID': empty value"),
    (_review(asin=13714), "line 4, field 'asin': expected a string, got 13714"),
])
def test_bad_review_lines_name_file_line_and_field(tmp_path, gzipped, bad, message):
  name = "Books_5.json.gz" if gzipped else "Books_5.json"
  path = _write(tmp_path / name, [_review(), _review(), _review(), bad, _review()],
                gzipped)
  with pytest.raises(DataError) as e:
    list(json_reader.iter_chunks(path, WANTED))
  assert str(e.value).startswith(path) and message in str(e.value)


def test_review_chunks_keep_line_numbers_across_blank_lines(tmp_path):
  lines = [_review(unixReviewTime=i) for i in range(3000)]
  lines[1000:1000] = [""]                               # a blank line at line 1001
  path = _write(tmp_path / "r.json.gz", lines + [_review(overall=9)], True)
  with pytest.raises(DataError, match="r.json.gz: line 3002, field 'overall'"):
    list(json_reader.iter_chunks(path, WANTED, chunk_bytes=10_000))
  path = _write(tmp_path / "ok.json", lines, False)
  chunks = list(json_reader.iter_chunks(path, WANTED, chunk_bytes=10_000))
  assert len(chunks) > 10 and chunks[-1][1] == chunks[-1][2] == os.path.getsize(path)
  got = np.concatenate([c["unixReviewTime"] for c, _, _ in chunks])
  np.testing.assert_array_equal(got, np.arange(3000))


def test_a_cut_off_gzip_file_is_named(tmp_path):
  path = _write(tmp_path / "Books_5.json.gz", [_review()] * 5000, True)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(DataError, match="Books_5.json.gz: the gzip stream is corrupt or "
                     "cut off"):
    list(json_reader.iter_chunks(path, WANTED))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r[:2] + ["6.0", r[3]], "line 5, column 'rating': value 6.0 out of range"),
    (lambda r: r[:2] + ["five", r[3]], "line 5, column 'rating': cannot parse 'five'"),
    (lambda r: r[:3], "line 5: expected 4 fields, got 3"),
    (lambda r: [r[0], ""] + r[2:], "line 5, column 'user': missing value"),
])
def test_bad_rating_lines_fail_the_builder_naming_file_line_and_column(
    books, tmp_path, edit, message):
  source = tmp_path / "src"
  shutil.copytree(books, source)
  rows = _ratings(source)
  rows[4] = edit(rows[4])
  (source / amazon_books.RATINGS_FILE).write_text("".join(",".join(r) + "\n"
                                                          for r in rows))
  with pytest.raises(DataError, match="Books.csv") as e:
    raw.prepare(_builder(source, tmp_path, "books_ratings"))
  assert message in str(e.value)
  assert not _builder(source, tmp_path, "books_ratings").is_prepared()


def test_a_bad_review_fails_the_builder_and_nothing_looks_complete(books, tmp_path):
  source = tmp_path / "src"
  shutil.copytree(books, source)
  reviews = [json.dumps(r) for r in _reviews(source)]
  reviews[6] = _review(overall=7.0)
  _write(source / amazon_books.REVIEWS_FILE, reviews, True)
  with pytest.raises(DataError, match=r"Books_5.json.gz: line 7, field 'overall': "
                     r"value 7.0 out of range \[1, 5\]"):
    raw.prepare(_builder(source, tmp_path))
  assert not _builder(source, tmp_path).is_prepared()


def test_missing_files_say_where_to_get_them_and_download_is_refused(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"missing source file\(s\) Books_5.json.gz; to "
                     r"fix: put them \(from https://nijianmo.github.io/amazon/\)"):
    raw.prepare(_builder(tmp_path / "empty", tmp_path))
  config = prepare.default_config("amazon_books", "books", download=True)
  with pytest.raises(ConfigError, match="no archive to download; fetch Books_5.json.gz"):
    config.validate()
  with pytest.raises(ConfigError, match="data.label='long_view' is KuaiRand's"):
    dataclasses.replace(config, download=False, label="long_view").validate()


def test_sample_through_the_builder_to_prepared_lists(tmp_path, monkeypatch):
  config = prepare.default_config(
      "amazon_books", "sample", data_dir=str(tmp_path), k_core=5, sample=TINY,
      retriever=retriever.RetrieverConfig(dim=8, learning_rate=3e-2, epochs=3,
                                          batch_size=512),
      lists=lists.ListConfig(protocol="retrieval", list_size=10, history_size=8))
  data = prepare.prepare_lists(config)
  assert not data.is_real and "NOT the real data" in data.name
  assert data.report["protocol"] == "retrieval"
  for split in ("train", "valid", "test"):
    arrays = data.splits[split]
    assert data.report[split]["lists"] == len(arrays["user"]) > 0
    assert arrays["items"].shape[1] == 10
    assert arrays["user_features"].shape == (len(arrays["user"]), 0)      # no features
    assert arrays["item_features"].shape == (len(arrays["user"]), 10, 0)
  monkeypatch.setattr(prepare, "build", lambda *a: pytest.fail("rebuilt"))
  again = prepare.prepare_lists(config)                # from the cache, zero-wide too
  for f, v in data.splits["test"].items():
    np.testing.assert_array_equal(again.splits["test"][f], v)


@pytest.mark.slow
def test_demo_flagfile_end_to_end(tmp_path):
  env = child_env.jax_child_env()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.amazon_books",
       "--flagfile=experiments/configs/demo_amazon_books.flags",
       f"--workdir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}",
       "--sample_users=150", "--sample_items=100", "--sample_rows_per_user=40",
       "--k_core=5", "--list_size=10", "--history_size=8", "--retriever_dim=8",
       "--retriever_epochs=2", "--methods=dnr_g", "--num_epochs=2",
       "--warmup_epochs=1", "--batch_size=32", "--hidden=16", "--plots=false"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Amazon-Books (5-core reviews) (GENERATED sample, NOT the real data)" in \
      proc.stderr
  assert "retrieval lists" in proc.stderr and "| prm | dnr_g |" in proc.stdout
