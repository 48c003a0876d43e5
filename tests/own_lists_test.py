"""Own lists: the format's reader, its vocabulary, the cached builder, the example."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from dnr_jax.batch import FIELDS
from dnr_jax.data import own_lists
from dnr_jax.data.own_lists import builder as own_lists_builder
from dnr_jax.data.own_lists import sample as own_lists_sample
from dnr_jax.errors import DataError

import child_env  # pylint: disable=g-bad-import-order  (tests/child_env.py)


def _rows():
  """Three lists with string ids: L1 has 4 candidates, L2 has 2, L3 has 3."""
  return {
      "list_id": ["L1"] * 4 + ["L2"] * 2 + ["L3"] * 3,
      "user_id": ["alice"] * 4 + ["bob"] * 2 + ["alice"] * 3,
      "item_id": ["pear", "fig", "kiwi", "plum", "fig", "lime", "kiwi", "pear", "lime"],
      "score": [0.2, 0.9, 0.5, 0.7, 0.3, 0.6, 0.1, 0.8, 0.4],
      "label": [0, 1, 0, 1, 1, 0, 0, 1, 0],
      "position": [3, 0, 2, 1, 1, 0, 0, 1, 2],
      "time": [10, 10, 10, 10, 20, 20, 30, 30, 30],
      "u_city": ["rome"] * 4 + ["oslo"] * 2 + ["rome"] * 3,
      "i_colour": ["green", "purple", "brown", "purple", "purple", "green", "brown",
                   "green", "green"],
  }


def _write(tmp_path, rows, fmt="parquet", name="lists"):
  path = str(tmp_path / f"{name}.{fmt}")
  table = pa.table(rows)
  if fmt == "parquet":
    pq.write_table(table, path)
  else:
    pa_csv.write_csv(table, path)
  return path


def _config(path, **kw):
  return own_lists.OwnListsConfig(lists=path, **{"list_size": 3, "history_size": 2,
                                                 **kw})


def _read_all(path, config, vocab=None, **kw):
  vocab = vocab or own_lists.fit_vocabulary(config)
  chunks = list(own_lists.read_lists(path, vocab=vocab, config=config, **kw))
  arrays = {f: np.concatenate([c.arrays[f] for c in chunks]) for f in FIELDS}
  item_ids = np.concatenate([c.item_ids for c in chunks])
  stats = sum((c.stats for c in chunks), own_lists.ReadStats())
  return arrays, item_ids, stats, chunks, vocab


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_string_ids_and_upstream_order(tmp_path, fmt):
  path = _write(tmp_path, _rows(), fmt)
  config = _config(path)
  arrays, item_ids, stats, chunks, vocab = _read_all(path, config)
  assert [l for c in chunks for l in c.list_ids] == ["L1", "L2", "L3"]
  # Upstream order is the position column, not the score; L1 (4 > n = 3) is cut to
  # its first three by position, L2 (2 < 3) padded.
  assert item_ids.tolist() == [["fig", "plum", "kiwi"], ["lime", "fig", None],
                               ["kiwi", "pear", "lime"]]
  np.testing.assert_allclose(arrays["scores"][0], [0.9, 0.7, 0.5])
  np.testing.assert_array_equal(arrays["labels"][0], [1, 1, 0])
  np.testing.assert_array_equal(arrays["mask"][1], [True, True, False])
  assert arrays["scores"][1, 2] == 0 and arrays["items"][1, 2] == 0
  ids, unknown = vocab.lookup_items(item_ids[0])
  np.testing.assert_array_equal(arrays["items"][0], ids)
  assert unknown == 0
  assert vocab.columns["item"] == ["fig", "kiwi", "lime", "pear", "plum"]
  assert arrays["user"].tolist() == [1, 2, 1]            # alice, bob
  assert arrays["user_features"][:, 0].tolist() == [2, 1, 2]   # oslo < rome
  assert stats.truncated_lists == 1 and stats.truncated_candidates == 1
  assert stats.padded_lists == 1 and stats.lists == 3 and stats.rows == 9
  assert stats.lists_without_history == 3     # no history source at all
  assert not arrays["history_mask"].any()
  for field in FIELDS:
    assert arrays[field].shape[0] == 3


def test_parquet_and_csv_give_the_same_arrays(tmp_path):
  a = _read_all(_write(tmp_path, _rows(), "parquet"),
                _config(str(tmp_path / "lists.parquet")))[0]
  b = _read_all(_write(tmp_path, _rows(), "csv"), _config(str(tmp_path / "lists.csv")))[0]
  for field in FIELDS:
    np.testing.assert_array_equal(a[field], b[field], err_msg=field)


def test_score_order_without_position_and_logits(tmp_path):
  rows = {k: v for k, v in _rows().items() if k != "position"}
  rows["score"] = [-2.0, 3.0, 0.0, 1.0, -1.0, 0.5, -3.0, 2.0, -0.5]   # logits
  path = _write(tmp_path, rows)
  arrays, item_ids, *_ = _read_all(path, _config(path, score_transform="sigmoid"))
  assert item_ids[0].tolist() == ["fig", "plum", "kiwi"]      # by score, descending
  assert item_ids[2].tolist() == ["pear", "lime", "kiwi"]
  np.testing.assert_allclose(arrays["scores"][0], 1 / (1 + np.exp(-np.array(
      [3.0, 1.0, 0.0]))), rtol=1e-6)


def test_chunks_never_split_a_list(tmp_path):
  path = _write(tmp_path, _rows())
  whole = _read_all(path, _config(path))
  small = _read_all(path, _config(path, chunk_rows=2))
  assert len(small[3]) == 3                       # one chunk per list here
  for field in FIELDS:
    np.testing.assert_array_equal(whole[0][field], small[0][field])


def test_history_from_interactions(tmp_path):
  path = _write(tmp_path, _rows())
  inter = _write(tmp_path, {
      "user_id": ["alice", "alice", "alice", "alice", "carol"],
      "item_id": ["lime", "kiwi", "pear", "fig", "fig"],
      "time": [1, 5, 9, 10, 1],
      "label": [1, 0, 1, 1, 1]}, name="interactions")
  config = _config(path, interactions=inter)
  vocab = own_lists.fit_vocabulary(config)
  history = own_lists.InteractionHistory.load(inter, vocab, config)
  assert history.stats["negatives_skipped"] == 1
  arrays, _, stats, _, _ = _read_all(path, config, vocab, history=history)
  v = dict(zip(vocab.columns["item"], range(1, 99)))
  # L1 at time 10: alice's positives strictly before 10 are lime (1), pear (9);
  # the negative kiwi is skipped, fig at time 10 is not before.
  assert arrays["history"][0].tolist() == [v["lime"], v["pear"]]
  # L3 at time 30: the last H = 2 positives, most recent last.
  assert arrays["history"][2].tolist() == [v["pear"], v["fig"]]
  # bob has no interactions: an empty history, counted.
  assert not arrays["history_mask"][1].any() and arrays["history"][1].sum() == 0
  assert stats.lists_without_history == 1


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_history_column(tmp_path, fmt):
  rows = _rows()
  lists = {"L1": ["lime", "pear", "fig"], "L2": [], "L3": ["mango", "kiwi"]}
  rows["history"] = [lists[l] if fmt == "parquet" else "|".join(lists[l])
                     for l in rows["list_id"]]
  path = _write(tmp_path, rows, fmt)
  config = _config(path)
  train_vocab = own_lists.fit_vocabulary(config)
  assert "mango" in train_vocab.columns["item"]        # history items get ids too
  vocab = own_lists.Vocabulary({**train_vocab.columns, "item": [
      i for i in train_vocab.columns["item"] if i != "mango"]},
      train_vocab.user_features, train_vocab.item_features)
  arrays, _, stats, _, _ = _read_all(path, config, vocab)
  v = dict(zip(vocab.columns["item"], range(1, 99)))
  assert arrays["history"].tolist() == [[v["pear"], v["fig"]], [0, 0], [0, v["kiwi"]]]
  assert arrays["history_mask"].tolist() == [[True, True], [False, False],
                                             [False, True]]
  assert stats.unknown == {"history": 1}               # mango, dropped and counted


def test_unknown_ids_at_inference_are_counted_not_errors(tmp_path):
  train = _write(tmp_path, _rows())
  config = _config(train)
  vocab = own_lists.fit_vocabulary(config)
  vocab.save(str(tmp_path / "vocab"))
  vocab = own_lists.Vocabulary.load(str(tmp_path / "vocab"))
  rows = {k: v for k, v in _rows().items() if k != "label"}
  rows["user_id"] = ["zoe"] * 4 + ["bob"] * 2 + ["alice"] * 3
  rows["item_id"][1] = "durian"
  rows["i_colour"][8] = "blue"
  infer = _write(tmp_path, rows, "csv", name="new")
  arrays, item_ids, stats, chunks, _ = _read_all(infer, config, vocab)
  assert not chunks[0].has_labels and not arrays["labels"].any()
  assert item_ids[0, 0] == "durian" and arrays["items"][0, 0] == 0
  assert arrays["mask"][0, 0]                  # still a candidate, scored by the model
  assert arrays["user"][0] == 0
  assert stats.unknown == {"user": 1, "item": 1, "i_colour": 1}
  assert stats.total_unknown == 3
  with pytest.raises(DataError, match=r"new.csv: missing column\(s\) \['label'\]"):
    list(own_lists.read_lists(infer, vocab=vocab, config=config, require_labels=True))


def test_vocabulary_maps_ids_as_text():
  vocab = own_lists.Vocabulary.fit({"item": [np.array([5, 7, 5]), ["9"]],
                                    "user": [["a", None, ""]]})
  assert vocab.columns == {"item": ["5", "7", "9"], "user": ["a"]}
  ids, unknown = vocab.lookup_items(["7", 5, 8, None])
  assert ids.tolist() == [2, 1, 0, 0] and unknown == 1      # None is missing, not new
  assert vocab.num_items == 4 and vocab.lookup_users(pa.array(["a"]))[0].tolist() == [1]


def test_vocabulary_lookup_paths_agree():
  # A batch much smaller than the vocabulary takes the dict path, a large one the
  # vectorised path: the same ids and counts either way.
  vocab = own_lists.Vocabulary.fit({"item": [[f"i{k}" for k in range(40)]]})
  small = vocab.lookup_items(["i7", "x", None])
  large = vocab.lookup_items(["i7", "x", None] * 10)
  assert small[0].tolist() == large[0].tolist()[:3] == [vocab.columns["item"].index(
      "i7") + 1, 0, 0]
  assert (small[1], large[1]) == (1, 10)


_BAD = [
    ("drop", "score", r"missing column\(s\) \['score'\]"),
    ("set", ("label", 4, 2), r"line 6, column 'label': value 2 is not 0 or 1"),
    ("set", ("score", 2, float("nan")), r"line 4, column 'score': non-finite score"),
    ("set", ("score", 2, 1.5), r"line 4, column 'score': score 1.5 is outside \[0, 1\]"),
    ("set", ("item_id", 3, "fig"), r"line 5, column 'item_id': item 'fig' appears "
     r"twice in list 'L1'"),
    ("set", ("user_id", 5, "carol"), r"line 7, column 'user_id': list 'L2' has several "
     "users"),
    ("set", ("list_id", 8, "L1"), r"line 10, column 'list_id': list 'L1' appears again"),
    ("set", ("time", 8, 31), r"line 10, column 'time': list 'L3' has several times"),
    ("set", ("position", 1, 3), r"line 3, column 'position': position 3 appears twice"),
    ("set", ("score", 0, "high"), r"line 2, column 'score': cannot parse 'high'"),
    ("set", ("user_id", 0, None), r"line 2, column 'user_id': missing value"),
]


@pytest.mark.parametrize("how, what, message", _BAD)
def test_bad_files_give_one_line_naming_file_row_and_column(tmp_path, how, what,
                                                           message):
  rows = {k: list(v) for k, v in _rows().items()}
  if how == "drop":
    del rows[what]
  else:
    column, row, value = what
    rows[column] = [str(v) for v in rows[column]] if isinstance(value, str) and \
        column in ("score",) else rows[column]
    rows[column][row] = value
  path = _write(tmp_path, rows, "csv")
  with pytest.raises(DataError) as e:
    _read_all(path, _config(path), own_lists.Vocabulary(
        {"user": ["alice", "bob"]}, ["u_city"], ["i_colour"]))
  text = str(e.value)
  assert "\n" not in text and text.startswith(path), text
  assert e.match(message), text


def test_bad_files_in_parquet_name_the_row(tmp_path):
  rows = _rows()
  rows["split"] = ["train"] * 4 + ["dev"] * 2 + ["test"] * 3
  path = _write(tmp_path, rows)
  with pytest.raises(DataError, match=r"lists.parquet: row 5, column 'split': 'dev' is "
                     r"not one of \['train', 'valid', 'test'\]"):
    _read_all(path, _config(path))
  with pytest.raises(DataError, match="no such file"):
    _read_all(str(tmp_path / "nope.parquet"), _config(str(tmp_path / "nope.parquet")))


# -- the cached builder --------------------------------------------------------------

@pytest.fixture(scope="module")
def example(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("data"))
  lists, inter = own_lists_sample.ensure_example(data_dir, own_lists_sample.ExampleConfig(
      num_users=30, num_items=60, lists_per_user=5))
  return data_dir, lists, inter


def test_generated_example_is_in_the_format(example):
  _, lists, inter = example
  table = pq.read_table(lists)
  assert set(own_lists.REQUIRED) <= set(table.column_names)
  assert {"u_segment", "u_country", "i_category", "i_brand", "position",
          "time"} <= set(table.column_names)
  assert isinstance(table["user_id"][0].as_py(), str)
  assert own_lists_builder.is_generated(lists)
  sizes = np.unique(table["list_id"].to_numpy(zero_copy_only=False),
                    return_counts=True)[1]
  assert sizes.min() < 20 < sizes.max()       # shorter and longer than n = 20
  assert set(pq.read_table(inter).column_names) == {"user_id", "item_id", "time"}


def test_prepare_splits_by_time_and_caches(example, monkeypatch):
  data_dir, lists, inter = example
  config = own_lists.OwnListsConfig(lists=lists, interactions=inter, list_size=20,
                                    history_size=8, data_dir=data_dir)
  data = own_lists.prepare_own_lists(config)
  assert not data.is_real and "NOT the real data" in data.name
  sizes = {s: len(data.splits[s]["user"]) for s in own_lists.SPLITS}
  assert sizes == {"train": 120, "valid": 15, "test": 15}    # 150 lists, 10% / 10%
  r = data.report
  assert r["split_by"] == "time" and r["history_source"] == "interactions"
  assert r["read"]["truncated_lists"] > 0 and r["read"]["padded_lists"] > 0
  assert r["train"]["raw_score_auc"] > 0.6
  assert own_lists.Vocabulary.load(r["vocab_dir"]).num_items == data.num_items
  assert data.user_feature_vocab == (4, 6) and len(data.item_feature_vocab) == 2
  # A second call reads the cache: nothing is built again.
  monkeypatch.setattr(own_lists_builder, "build", lambda *a: pytest.fail("rebuilt"))
  again = own_lists.prepare_own_lists(config)
  for s in own_lists.SPLITS:
    for f in FIELDS:
      np.testing.assert_array_equal(again.splits[s][f], data.splits[s][f])


def test_prepare_by_split_column(tmp_path):
  rows = {k: v * 4 for k, v in _rows().items()}
  rows["list_id"] = [f"{l}-{k}" for k in range(4) for l in _rows()["list_id"]]
  rows["split"] = ["train"] * 18 + ["valid"] * 9 + ["test"] * 9
  path = _write(tmp_path, rows)
  data = own_lists.prepare_own_lists(_config(path, data_dir=str(tmp_path / "d")))
  assert data.report["split_by"] == "column" and data.is_real
  assert {s: len(data.splits[s]["user"]) for s in own_lists.SPLITS} == {
      "train": 6, "valid": 3, "test": 3}
  assert data.splits["valid"]["items"].shape == (3, 3)
  assert os.path.exists(os.path.join(data.report["vocab_dir"], "vocab.json"))


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags, timeout=600):
  env = child_env.jax_child_env()
  return subprocess.run([sys.executable, "-m", "experiments.lists", *flags], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_lists_binary_on_the_generated_example(tmp_path):
  proc = _run("--flagfile=experiments/configs/lists_example.flags",
              f"--workdir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}",
              "--example_users=30", "--example_items=60", "--example_lists_per_user=5",
              "--history_size=8", "--methods=dnr_g", "--num_epochs=2",
              "--warmup_epochs=1", "--batch_size=32", "--hidden=16", "--plots=false")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "GENERATED example, NOT the real data" in proc.stderr
  assert "raw upstream score AUC" in proc.stderr           # the preparation report
  assert "| prm | dnr_g |" in proc.stdout and "NOT the real data" in proc.stdout
  out = tmp_path / "out"
  assert (out / "runs/prm/dnr_g/seed0/metrics.jsonl").exists()
  # What reranking later needs travels with the run.
  config, vocab = own_lists.load_from_run(str(out))
  assert config.list_size == 20 and config.history_size == 8
  assert vocab.num_users == 31 and vocab.user_features == ("u_segment", "u_country")
  assert json.loads((out / "data_config.json").read_text())["num_items"] == \
      vocab.num_items
  # ... and in each run's bundle, which experiments.rerank reads.
  from dnr_jax import serving  # pylint: disable=g-import-not-at-top
  bundle = serving.load_bundle(str(out / "runs/prm/dnr_g/seed0"))
  assert bundle.vocabulary() == vocab
  assert bundle.data_config["list_size"] == 20 and bundle.meta["history_size"] == 8


@pytest.mark.slow
def test_lists_binary_trains_from_disk_as_from_memory(tmp_path):
  common = ("--flagfile=experiments/configs/lists_example.flags",
            f"--data_dir={tmp_path / 'data'}", "--example_users=30",
            "--example_items=60", "--example_lists_per_user=5", "--history_size=8",
            "--methods=c_score", "--num_epochs=2", "--batch_size=32", "--hidden=16",
            "--plots=false")
  results = {}
  for mode in ("memory", "disk"):
    proc = _run(*common, f"--workdir={tmp_path / mode}", f"--input={mode}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[mode] = json.loads((tmp_path / mode / "results.json").read_text())
  # The training split was written once as list records, beside the prepared lists.
  assert len(list((tmp_path / "data").rglob("train.list_records"))) == 1
  strip = lambda r: [{k: v for k, v in run.items() if k not in ("lists_per_s", "time_s")}
                     for run in r["runs"]]
  assert strip(results["disk"]) == strip(results["memory"])


def test_lists_binary_bad_file_is_one_line(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("list_id,user_id,item_id,score,label\n1,u,a,0.5,1\n1,u,b,0.2,3\n")
  proc = _run(f"--lists={bad}", f"--workdir={tmp_path / 'out'}",
              f"--data_dir={tmp_path / 'data'}", timeout=120)
  assert proc.returncode == 3                 # a data error (cli.EXIT_CODES)
  assert proc.stderr.strip().splitlines()[-1] == (
      f"DataError: {bad}: line 3, column 'label': value 3 is not 0 or 1")
