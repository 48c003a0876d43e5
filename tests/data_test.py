"""The raw-data builders, the samples, bad input, caching and the list preparation."""

import dataclasses
import functools
import http.server
import os
import shutil
import tarfile
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dnr_jax.data import archives, csv_reader, kuairand, lists, movielens, prepare
from dnr_jax.data import preprocess, raw, retriever, samples
from dnr_jax.batch import FIELDS
from dnr_jax.errors import DataError
from dnr_jax.data.csv_reader import Column

tfds.disable_progress_bar()
TINY = samples.SampleConfig(num_users=80, num_items=60, rows_per_user=60)
ML_TINY = samples.SampleConfig(num_users=60, num_items=80, rows_per_user=40)
DATA = prepare.DataConfig(
    k_core=5, sample=TINY, retriever=retriever.RetrieverConfig(
        dim=8, learning_rate=3e-2, epochs=3, batch_size=512),
    lists=lists.ListConfig(list_size=10, history_size=8, min_list_size=5))


@pytest.fixture(scope="module")
def kuairand_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("kuairand")
  samples.write_kuairand(str(root), TINY)
  return root


def _copy(src, tmp_path):
  dst = tmp_path / "src"
  shutil.copytree(src, dst)
  return dst


def _builder(source, tmp_path, config="sample", cls=kuairand.Kuairand):
  return cls(config=config, data_dir=str(tmp_path / "tfds"), source_dir=str(source))


def _log_file(source):
  return source / "KuaiRand-Pure" / "data" / "log_standard_4_08_to_4_21_pure.csv"


def test_kuairand_sample_has_the_real_schema_and_prepares(kuairand_dir, tmp_path):
  data = kuairand_dir / "KuaiRand-Pure" / "data"
  header = _log_file(kuairand_dir).read_text().splitlines()[0].split(",")
  assert header == [c.name for c in kuairand.LOG_COLUMNS]
  users_header = (data / "user_features_pure.csv").read_text().splitlines()[0]
  assert users_header.startswith("user_id,user_active_degree,is_lowactive_period,")
  assert users_header.endswith(",onehot_feat17")
  videos_header = (data / "video_features_basic_pure.csv").read_text().splitlines()[0]
  assert videos_header == ("video_id,author_id,video_type,upload_dt,upload_type,"
                           "visible_status,video_duration,server_width,server_height,"
                           "music_id,music_type,tag")
  builder = raw.prepare(_builder(kuairand_dir, tmp_path))
  assert builder.info.metadata["is_real"] is False
  rows = sum(len((data / f).read_text().splitlines()) - 1
             for f in builder.builder_config.tables[0].files)
  assert builder.info.metadata["log_rows"] == rows
  log = kuairand.to_interactions(builder)
  standard = rows - int(raw.read_table(builder, "log", ["is_rand"])["is_rand"].sum())
  assert log.num_rows == standard                      # random exposures left out
  assert np.all(np.diff(log.time) >= 0)                # time-sorted
  assert not log.is_real and "NOT the real data" in log.name
  assert log.user_features.shape == (log.num_users, len(kuairand.USER_FEATURES))
  assert log.item_features[1:].min() >= 1              # every video has features
  long_view = kuairand.to_interactions(builder, label="long_view", include_random=True)
  assert long_view.num_rows == rows
  assert long_view.label.mean() != log.label.mean()


@pytest.mark.parametrize("variant", ["100k", "1m"])
def test_movielens_fixture_prepares(tmp_path, variant):
  folder = samples.write_movielens(str(tmp_path / "src"), ML_TINY, variant)
  builder = raw.prepare(_builder(tmp_path / "src", tmp_path, variant,
                                 movielens.Movielens))
  log = movielens.to_interactions(builder, threshold=4)
  ratings = "u.data" if variant == "100k" else "ratings.dat"
  lines = open(os.path.join(folder, ratings)).read().splitlines()
  assert log.num_rows == len(lines)
  stars = np.array([int(l.replace("::", "\t").split("\t")[2]) for l in lines])
  assert log.label.sum() == (stars >= 4).sum()
  assert log.user_features.shape[1] == 3 and log.item_features[1:].min() >= 1


def test_missing_files_are_each_named_with_where_to_put_them(tmp_path):
  (tmp_path / "empty").mkdir()
  builder = _builder(tmp_path / "empty", tmp_path, config="pure")
  with pytest.raises(DataError) as e:
    raw.prepare(builder)
  msg = str(e.value)
  for name in ("log_standard_4_08_to_4_21_pure.csv", "log_random_4_22_to_5_08_pure.csv",
               "user_features_pure.csv", "video_features_basic_pure.csv"):
    assert name in msg
  assert "KuaiRand-Pure.tar.gz" in msg and str(tmp_path / "empty") in msg
  assert not builder.is_prepared()


def _rewrite_line(path, line_no, fn):
  lines = path.read_text().splitlines()
  lines[line_no - 1] = fn(lines[line_no - 1])
  path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, message", [
    (lambda l: l.replace(l.split(",")[1], "abc", 1), "line 7, column 'video_id': cannot "
     "parse 'abc'"),
    (lambda l: ",".join(l.split(",")[:5] + ["2"] + l.split(",")[6:]),
     "line 7, column 'is_click': value 2 out of range [0, 1]"),
    (lambda l: ",".join(l.split(",")[:4] + [""] + l.split(",")[5:]),
     "line 7, column 'time_ms': missing value"),
    (lambda l: ",".join(l.split(",")[:-1]), "line 7: expected 19 fields, got 18"),
])
def test_bad_rows_name_file_line_column_and_problem(kuairand_dir, tmp_path, edit,
                                                    message):
  source = _copy(kuairand_dir, tmp_path)
  _rewrite_line(_log_file(source), 7, edit)
  builder = _builder(source, tmp_path)
  with pytest.raises(DataError, match="log_standard_4_08_to_4_21_pure.csv") as e:
    raw.prepare(builder)
  assert message in str(e.value)
  assert not _builder(source, tmp_path).is_prepared()   # nothing looks complete


def test_missing_column_is_named(kuairand_dir, tmp_path):
  source = _copy(kuairand_dir, tmp_path)
  _rewrite_line(_log_file(source), 1, lambda l: l.replace("is_click", "is_clicked"))
  with pytest.raises(DataError, match=r"line 1: missing column\(s\) \['is_click'\]"):
    raw.prepare(_builder(source, tmp_path))


def test_nan_in_a_float_column(tmp_path):
  path = tmp_path / "x.csv"
  path.write_text("a,b\n1,0.5\n2,nan\n")
  with pytest.raises(DataError, match=r"x.csv: line 3, column 'b': NaN"):
    list(csv_reader.iter_chunks(str(path), [Column("a"), Column("b", kind="float",
                                                                dtype="float32")]))


def test_chunks_keep_line_numbers(tmp_path):
  path = tmp_path / "x.csv"
  path.write_text("a\n" + "".join(f"{i}\n" for i in range(5000)) + "x\n")
  with pytest.raises(DataError, match="line 5002, column 'a'"):
    list(csv_reader.iter_chunks(str(path), [Column("a")], chunk_bytes=1000))
  path.write_text("a\n" + "".join(f"{i}\n" for i in range(5000)))
  got = np.concatenate([c["a"] for c, _, _ in csv_reader.iter_chunks(
      str(path), [Column("a")], chunk_bytes=1000)])
  np.testing.assert_array_equal(got, np.arange(5000))


def test_checksum_mismatch_names_the_archive(tmp_path):
  samples.write_movielens(str(tmp_path / "gen"), ML_TINY, "100k", as_zip=True)
  (tmp_path / "src").mkdir()
  shutil.copy(tmp_path / "gen" / "ml-100k.zip", tmp_path / "src" / "ml-100k.zip")
  with pytest.raises(DataError, match=r"ml-100k.zip: md5 [0-9a-f]{32} does not match "
                     "the published 0e33842e24a9c977be4e0107933c0723"):
    raw.prepare(_builder(tmp_path / "src", tmp_path, "100k", movielens.Movielens))


def test_interrupted_preparation_never_looks_complete(kuairand_dir, tmp_path,
                                                      monkeypatch):
  real = csv_reader.iter_chunks

  def dies_after_the_first_chunk(*args, **kwargs):
    yield next(real(*args, **kwargs))
    raise KeyboardInterrupt("preempted")

  monkeypatch.setattr(csv_reader, "iter_chunks", dies_after_the_first_chunk)
  with pytest.raises(KeyboardInterrupt):
    raw.prepare(_builder(kuairand_dir, tmp_path))
  assert not _builder(kuairand_dir, tmp_path).is_prepared()
  monkeypatch.setattr(csv_reader, "iter_chunks", real)
  builder = raw.prepare(_builder(kuairand_dir, tmp_path))
  assert builder.is_prepared() and builder.info.metadata["log_rows"] > 0


def test_prepare_lists_caches_by_config(tmp_path, monkeypatch):
  config = dataclasses.replace(DATA, data_dir=str(tmp_path))
  first = prepare.prepare_lists(config)
  assert not first.is_real and "NOT the real data" in first.name
  report = first.report
  assert report["retriever"]["heldout_auc"] > 0.5
  for split in ("train", "valid", "test"):
    assert report[split]["lists"] > 0
    assert report[split]["raw_score_auc"] > 0.5        # informative, not inverted
  assert first.splits["train"]["items"].shape[1] == 10
  # The second run reads the cache: nothing is rebuilt.
  monkeypatch.setattr(prepare, "build", lambda c: pytest.fail("rebuilt"))
  second = prepare.prepare_lists(config)
  for f, v in first.splits["train"].items():
    np.testing.assert_array_equal(second.splits["train"][f], v)
  assert second.report == report
  other = dataclasses.replace(config, lists=dataclasses.replace(config.lists,
                                                                history_size=4))
  assert prepare.cache_key(other) != prepare.cache_key(config)
  # Where the files live is not part of the key; what shapes the lists is.
  assert prepare.cache_key(dataclasses.replace(config, data_dir="/elsewhere")) == \
      prepare.cache_key(config)


def test_movielens_retrieval_lists_are_informative(tmp_path):
  samples.write_movielens(str(tmp_path / "src"), samples.SampleConfig(
      num_users=300, num_items=400, rows_per_user=60), "1m")
  config = prepare.default_config(
      "movielens", "1m", source_dir=str(tmp_path / "src"), data_dir=str(tmp_path),
      k_core=5, retriever=retriever.RetrieverConfig(dim=16, learning_rate=3e-2,
                                                    epochs=20, batch_size=256),
      lists=lists.ListConfig(protocol="retrieval", list_size=10, history_size=8))
  data = prepare.prepare_lists(config)
  assert data.report["protocol"] == "retrieval"
  for split in ("train", "valid", "test"):
    assert data.report[split]["raw_score_auc"] > 0.5, data.report[split]


@pytest.mark.parametrize("change, message", [
    (dict(dataset="amazon"), "data.dataset='amazon'"),
    (dict(variant="10m"), "data.variant='10m'"),
    (dict(label="is_watched"), "data.label='is_watched'"),
    (dict(k_core=0), "data.k_core=0"),
    (dict(lists=lists.ListConfig(min_list_size=60)), "lists.min_list_size=60"),
])
def test_bad_data_config(change, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    dataclasses.replace(DATA, **change).validate()


def _sorted_lists(split):
  """A split's lists in a canonical order (shards emit them shard by shard)."""
  key = np.lexsort(tuple(split["items"].T[::-1]) + tuple(split["history"].T[::-1])
                   + (split["user"],))
  return {k: v[key] for k, v in split.items()}


@pytest.mark.parametrize("protocol", ["exposure", "retrieval"])
def test_streamed_sharded_build_equals_the_in_memory_one(tmp_path, protocol):
  """Preparation in user shards of a few hundred rows (the bounded-memory path)
  makes exactly the lists of loading the whole log, k-core and all, in memory."""
  config = dataclasses.replace(DATA, data_dir=str(tmp_path), shard_rows=700,
                               lists=dataclasses.replace(DATA.lists, protocol=protocol))
  spill = tmp_path / "spill"
  spill.mkdir()
  built = prepare.build(config, str(spill))
  assert built.meta["report"]["shards"] > 3
  streamed = {name: {k: np.concatenate([np.load(f)[k] for f in files])
                     for k in FIELDS} for name, files in built.files.items()}
  # The same stages on the whole log in memory.
  log = preprocess.k_core(prepare.load_interactions(config), config.k_core)
  end = built.meta["report"]["time_splits"]["retriever_end"]
  early = (log.time < end) & (log.label > 0)
  params, report = prepare.train_retriever(log.user[early], log.item[early],
                                           log.num_users, log.num_items,
                                           config.retriever)
  assert report["heldout_auc"] == built.meta["report"]["retriever"]["heldout_auc"]
  whole = lists.build_lists(log, params, config.lists, end)
  assert whole.report["time_splits"] == built.meta["report"]["time_splits"]
  for name in lists.SPLITS:
    a, b = _sorted_lists(streamed[name]), _sorted_lists(whole.splits[name])
    for k in FIELDS:
      if k == "scores":   # XLA may round a chunk of another shape 1 ulp apart
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=f"{name}/{k}")
      else:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}/{k}")
    assert built.meta["report"][name] == pytest.approx(whole.report[name], rel=1e-6)


@pytest.fixture
def http_mirror(tmp_path):
  """A directory served over HTTP on localhost (TFDS downloads http(s) URLs with
  requests; its copy of local paths needs TensorFlow, which is not a dependency)."""
  mirror = tmp_path / "mirror"
  mirror.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(mirror))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield mirror, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def test_kuairand_archive_download_and_checksum(kuairand_dir, tmp_path, http_mirror):
  """The official archive's path: fetched by TFDS's download manager (from a local
  HTTP mirror), md5-checked, extracted and prepared."""
  mirror, url = http_mirror
  archive = mirror / "KuaiRand-Pure.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(kuairand_dir / "KuaiRand-Pure", arcname="KuaiRand-Pure")
  config = dataclasses.replace(kuairand.CONFIGS["pure"], name="pure_mirror",
                               url=f"{url}/{archive.name}?download=1",
                               md5=archives.md5sum(str(archive)))
  (tmp_path / "empty").mkdir()
  builder = kuairand.Kuairand(config=config, data_dir=str(tmp_path / "tfds"),
                              source_dir=str(tmp_path / "empty"), download=True)
  raw.prepare(builder)
  expected = raw.prepare(_builder(kuairand_dir, tmp_path / "plain"))
  assert builder.info.metadata["log_rows"] == expected.info.metadata["log_rows"]
  assert builder.info.metadata["is_real"] is False      # the marker came along
  # The archive placed in the source directory by hand: no download needed.
  placed = tmp_path / "placed"
  placed.mkdir()
  shutil.copy(archive, placed / archive.name)
  by_hand = kuairand.Kuairand(config=config, data_dir=str(tmp_path / "tfds2"),
                              source_dir=str(placed))
  assert raw.prepare(by_hand).info.metadata["log_rows"] == \
      expected.info.metadata["log_rows"]
  # The published checksum (the real archive's) does not match this one.
  real = kuairand.Kuairand(config=dataclasses.replace(config, url=None,
                                                      md5=kuairand.CONFIGS["pure"].md5),
                           data_dir=str(tmp_path / "tfds3"), source_dir=str(placed))
  with pytest.raises(DataError, match=r"KuaiRand-Pure.tar.gz: md5 [0-9a-f]{32} does not "
                     "match the published 0820331067a3784d9691136f772b35a7"):
    raw.prepare(real)
  assert not real.is_prepared()


def test_movielens_zip_download(tmp_path, http_mirror):
  mirror, url = http_mirror
  samples.write_movielens(str(mirror), ML_TINY, "1m", as_zip=True)
  shutil.rmtree(mirror / "ml-1m")                     # only the zip is served
  config = dataclasses.replace(movielens.CONFIGS["1m"], name="1m_mirror",
                               url=f"{url}/ml-1m.zip",
                               md5=archives.md5sum(str(mirror / "ml-1m.zip")))
  (tmp_path / "empty").mkdir()
  builder = raw.prepare(movielens.Movielens(
      config=config, data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "empty"),
      download=True))
  assert builder.info.metadata["log_rows"] > 0
  assert builder.info.metadata["is_real"] is False
