"""Batch reranking of own lists (dnr_jax.serving.rerank_files, experiments.rerank)."""

import dataclasses
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnr_jax import config as config_lib
from dnr_jax import errors
from dnr_jax.protocol import report as report_lib
from dnr_jax.runtime import pipeline
from dnr_jax.serving import rerank_files as reranking
from dnr_jax import serving
from dnr_jax.runtime import runner as runner_lib
from dnr_jax import train
from dnr_jax.data import own_lists
from dnr_jax.data.own_lists import sample as own_lists_sample
from dnr_jax.data import types as data_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = tuple(jax.devices()[:2])
N, H = 10, 5


def _read(path, config, vocab, history=None):
  chunks = list(own_lists.read_lists(path, vocab=vocab, config=config,
                                     history=history))
  return {k: np.concatenate([c.arrays[k] for c in chunks]) for k in chunks[0].arrays}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny c-score run on a generated own-lists example, with its bundle."""
  root = tmp_path_factory.mktemp("rerank")
  lists, inter = own_lists_sample.write_example(
      str(root / "example"), own_lists_sample.ExampleConfig(
          num_users=30, num_items=60, lists_per_user=4, min_candidates=6,
          max_candidates=14))
  data_config = own_lists.OwnListsConfig(lists=lists, interactions=inter, list_size=N,
                                         history_size=H, chunk_rows=200)
  vocab = own_lists.fit_vocabulary(data_config)
  vocab_dir = str(root / "vocab")
  vocab.save(vocab_dir)
  history = own_lists.InteractionHistory.load(inter, vocab, data_config)
  arrays = _read(lists, data_config, vocab, history)
  cut = {"train": slice(0, 64), "valid": slice(64, 96), "test": slice(96, 120)}
  data = data_types.PreparedLists(
      splits={s: {k: v[c] for k, v in arrays.items()} for s, c in cut.items()},
      num_items=vocab.num_items, num_users=vocab.num_users,
      user_feature_vocab=vocab.user_feature_vocab,
      item_feature_vocab=vocab.item_feature_vocab, name="generated", is_real=False)
  cfg = config_lib.apply_method(config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden=16, num_heads=2, dropout=0.1),
      num_epochs=1, global_batch_size=32, eval_batch_size=32, log_every_steps=0,
      eval_shuffled_scores=False), "c_score")
  workdir = root / "workdir"
  result = train.train_and_evaluate(cfg, data, str(workdir / "runs" / "prm" / "c_score"
                                                   / "seed0"), devices=DEVICES)
  bundle = serving.Bundle.from_result(
      result, list_size=N, history_size=H, vocabulary_dir=vocab_dir,
      data_config=dataclasses.asdict(data_config))
  serving.save_bundle(str(workdir / "runs" / "prm" / "c_score" / "seed0" / "bundle"),
                      bundle)
  return types.SimpleNamespace(
      root=root, lists=lists, inter=inter, workdir=str(workdir), arrays=arrays,
      result=result, bundle=serving.load_bundle(str(workdir)), config=data_config,
      vocab=vocab)


def _rerank(run, output, **kw):
  kw.setdefault("interactions", run.inter)
  return reranking.rerank_file(run.bundle, kw.pop("lists", run.lists), str(output),
                               devices=DEVICES, **kw)


def test_output_order_and_scores_identical_to_training_eval(run, tmp_path):
  out = tmp_path / "out.parquet"
  report = _rerank(run, out)
  assert report["lists"] == 120 and report["lists_per_s"] > 0
  table = pq.read_table(out)
  assert table.column_names == list(reranking.COLUMNS) + ["label"]
  assert table.num_rows == int(run.arrays["mask"].sum()) == report["written_rows"]
  col = {c: np.asarray(table[c].to_pylist()) for c in table.column_names}
  # The in-process eval logits of train.py's Runner on the same lists.
  cfg = run.bundle.config
  runner = runner_lib.Runner(cfg, DEVICES)
  state = types.SimpleNamespace(reranker=types.SimpleNamespace(
      params=runner.put_state(run.result["best_params"])))
  arrays = pipeline.complete(run.arrays)
  logits = np.concatenate([
      np.asarray(runner.evaluate(state, b)[1])
      for b in pipeline.batches(arrays, cfg.eval_batch_size, shuffle=False)])[:120]
  list_index = {l: i for i, l in enumerate(dict.fromkeys(col["list_id"]))}
  rows = np.array([list_index[l] for l in col["list_id"]])
  slots = col["upstream_position"] - 1
  np.testing.assert_array_equal(col["reranker_score"], logits[rows, slots])
  np.testing.assert_array_equal(col["upstream_score"], arrays["scores"][rows, slots])
  for i in range(120):
    g = rows == i
    assert list(col["rank"][g]) == list(range(1, g.sum() + 1))  # rows in the new order
    s = col["reranker_score"][g]
    assert np.all(s[:-1] >= s[1:])                               # ... which is by score
  # Raw ids come back as they were given.
  first = pq.read_table(run.lists).slice(0, 1).to_pylist()[0]
  assert first["item_id"] in set(col["item_id"][col["list_id"] == first["list_id"]])


def test_top_k_keeps_the_first_k_of_the_new_order(run, tmp_path):
  _rerank(run, tmp_path / "a.parquet")
  full = pq.read_table(tmp_path / "a.parquet")
  _rerank(run, tmp_path / "b.parquet", top_k=3)
  top = pq.read_table(tmp_path / "b.parquet")
  assert max(top["rank"].to_pylist()) == 3
  expected = full.filter(np.asarray(full["rank"].to_pylist()) <= 3)
  assert top.equals(expected)


def test_labelled_lists_give_the_training_metrics(run, tmp_path):
  report = _rerank(run, tmp_path / "out.parquet")
  cfg = run.bundle.config
  runner = runner_lib.Runner(cfg, DEVICES)
  state = types.SimpleNamespace(reranker=types.SimpleNamespace(
      params=runner.put_state(run.result["best_params"])))
  arrays = pipeline.complete(run.arrays)
  want = train.evaluate(runner, state, arrays, cfg.eval_batch_size,
                        num_items=cfg.model.num_items)
  upstream = train.evaluate_retriever(arrays, k=cfg.eval_k,
                                      map_normaliser=cfg.map_normaliser,
                                      num_items=cfg.model.num_items)
  got = report["metrics"]
  for key in ("hr", "ndcg", "map", "f1", "auc", "global_auc", "coverage"):
    np.testing.assert_allclose(got["reranker"][key], want[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(got["upstream"][key], upstream[key], rtol=1e-6,
                               err_msg=key)
  md = reranking.metrics_table(run.bundle, got, str(tmp_path / "m.md"),
                               str(tmp_path / "m.csv"), "check")
  assert f"| prm | c_score | {100 * want['hr']:.2f} |" in md
  assert "| - | upstream |" in md
  assert [c for c, _ in report_lib.COLUMNS][:5] == ["hr", "ndcg", "map", "f1",
                                                        "global_auc"]


def test_unlabelled_lists_with_unknown_ids(run, tmp_path):
  table = pq.read_table(run.lists).drop(["label"])
  items = table["item_id"].to_pylist()
  items[0] = "never-seen-item"
  table = table.set_column(table.schema.get_field_index("item_id"), "item_id",
                           pa.array(items))
  path = str(tmp_path / "new.parquet")
  pq.write_table(table, path)
  report = _rerank(run, tmp_path / "out.parquet", lists=path)
  assert report["metrics"] is None and not report["has_labels"]
  assert report["stats"]["unknown"].get("item") == 1
  out = pq.read_table(tmp_path / "out.parquet")
  assert "label" not in out.column_names
  assert "never-seen-item" in set(out["item_id"].to_pylist())


def test_output_is_atomic(run, tmp_path):
  table = pq.read_table(run.lists)
  scores = table["score"].to_numpy().copy()
  scores[-1] = 2.0                # a bad row in the last chunk
  path = str(tmp_path / "bad.parquet")
  pq.write_table(table.set_column(table.schema.get_field_index("score"), "score",
                                  pa.array(scores)), path)
  out = tmp_path / "out.parquet"
  out.write_bytes(b"previous output")
  with pytest.raises(errors.DNRError, match=r"bad.parquet.*score 2 is outside"):
    _rerank(run, out, lists=path)
  assert out.read_bytes() == b"previous output"
  assert sorted(os.listdir(tmp_path)) == ["bad.parquet", "out.parquet"]
  with pytest.raises(errors.ConfigError, match="does not exist"):
    _rerank(run, tmp_path / "no" / "out.parquet")


def _binary(*flags, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("DNR_TEST_COMPILE_CACHE", ""))
  return subprocess.run([sys.executable, "-m", "experiments.rerank", *flags], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_rerank_binary_end_to_end(run, tmp_path):
  out = tmp_path / "out.parquet"
  proc = _binary(f"--checkpoint={run.workdir}", f"--lists={run.lists}",
                 f"--interactions={run.inter}", f"--output={out}", "--top_k=6",
                 f"--export={tmp_path / 'exported'}", "--compilation_cache=")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "lists/s" in proc.stdout and "| - | upstream |" in proc.stdout
  assert "unknown ids (mapped to 0): none" in proc.stdout
  assert pq.read_table(out)["rank"].to_numpy().max() == 6
  assert (tmp_path / "out.parquet.metrics.md").exists()
  assert (tmp_path / "exported" / "reranker.jax").exists()
  assert (tmp_path / "exported" / "vocabulary" / "vocab.json").exists()


@pytest.mark.parametrize("what", ["checkpoint", "columns", "output"])
def test_rerank_binary_bad_inputs_are_one_line(run, tmp_path, what):
  bad_lists = tmp_path / "bad.csv"
  bad_lists.write_text("list_id,item\n1,2\n")
  flags = {"checkpoint": [f"--checkpoint={tmp_path / 'nope'}", f"--lists={run.lists}",
                          f"--output={tmp_path / 'o.parquet'}"],
           "columns": [f"--checkpoint={run.workdir}", f"--lists={bad_lists}",
                       f"--output={tmp_path / 'o.parquet'}"],
           "output": [f"--checkpoint={run.workdir}", f"--lists={run.lists}",
                      f"--output={tmp_path / 'no' / 'o.parquet'}"]}[what]
  message, code = {"checkpoint": ("CheckpointError: --checkpoint=", 4),
                   "columns": ("missing column(s) ['user_id', 'item_id', 'score']", 3),
                   "output": ("does not exist", 2)}[what]
  proc = _binary(*flags, timeout=300)
  assert proc.returncode == code, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert message in last, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
