"""Batch reranking of own lists (dnr_jax.serving.rerank_files, experiments.rerank)."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dnr_jax import errors
from dnr_jax.protocol import report as report_lib
from dnr_jax.runtime import pipeline
from dnr_jax.serving import export
from dnr_jax.serving import rerank_files as reranking
from dnr_jax import serving
from dnr_jax.runtime import runner as runner_lib
from dnr_jax import train
from dnr_jax.data import own_lists

import child_env  # pylint: disable=g-bad-import-order  (tests/child_env.py)
import tiny_runs  # pylint: disable=g-bad-import-order  (tests/tiny_runs.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = tuple(jax.devices()[:2])
N, H = 10, 5


_read = tiny_runs.read_arrays


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny c-score run on a generated own-lists example, with its bundle."""
  return tiny_runs.own_lists_run(tmp_path_factory.mktemp("rerank"), N, H, DEVICES)


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
  assert table.num_rows == report["written_rows"] == pq.read_table(run.lists).num_rows
  assert report["not_reranked_rows"] == report["stats"]["truncated_candidates"] > 0
  table = table.filter(table["reranked"])     # the candidates beyond n: see below
  assert table.num_rows == int(run.arrays["mask"].sum())
  col = {c: np.asarray(table[c].to_pylist()) for c in table.column_names}
  # The in-process eval logits of train.py's Runner on the same lists.
  arrays = pipeline.complete(run.arrays)
  logits = tiny_runs.eval_logits(run, DEVICES)
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
  env = child_env.jax_child_env(2)
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


@pytest.mark.parametrize("what", ["checkpoint", "columns", "output", "triton"])
def test_rerank_binary_bad_inputs_are_one_line(run, tmp_path, what):
  bad_lists = tmp_path / "bad.csv"
  bad_lists.write_text("list_id,item\n1,2\n")
  flags = {"checkpoint": [f"--checkpoint={tmp_path / 'nope'}", f"--lists={run.lists}",
                          f"--output={tmp_path / 'o.parquet'}"],
           "columns": [f"--checkpoint={run.workdir}", f"--lists={bad_lists}",
                       f"--output={tmp_path / 'o.parquet'}"],
           "output": [f"--checkpoint={run.workdir}", f"--lists={run.lists}",
                      f"--output={tmp_path / 'no' / 'o.parquet'}"],
           "triton": [f"--checkpoint={run.workdir}", f"--export={tmp_path / 'e'}",
                      "--export_format=triton", "--triton_intra_op_threads=-1"]}[what]
  message, code = {"checkpoint": ("CheckpointError: --checkpoint=", 4),
                   "columns": ("missing column(s) ['user_id', 'item_id', 'score']", 3),
                   "output": ("does not exist", 2),
                   "triton": ("flag --triton_intra_op_threads=-1: -1 is not a "
                              "non-negative integer", 2)}[what]
  proc = _binary(*flags, timeout=300)
  assert proc.returncode == code, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert message in last, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


# ---- bad or odd inputs on the engineer's path ------------------------------------------

def _by_list(table) -> dict:
  """A table's rows grouped by list, in their order."""
  out = {}
  for row in table.to_pylist():
    out.setdefault(row["list_id"], []).append(row)
  return out


def test_candidates_beyond_n_are_kept_after_the_reranked_ones(run, tmp_path):
  report = _rerank(run, tmp_path / "out.parquet")
  out = _by_list(pq.read_table(tmp_path / "out.parquet"))
  given = {l: sorted(rows, key=lambda r: r["position"])
           for l, rows in _by_list(pq.read_table(run.lists)).items()}
  assert sum(map(len, out.values())) == sum(map(len, given.values()))  # every row
  long_lists = [l for l, rows in given.items() if len(rows) > N]
  assert len(long_lists) == report["stats"]["truncated_lists"] > 0
  for lid in long_lists:
    rows, items = out[lid], [r["item_id"] for r in given[lid]]
    assert [r["rank"] for r in rows] == list(range(1, len(items) + 1))
    assert [r["reranked"] for r in rows] == [True] * N + [False] * (len(items) - N)
    assert {r["item_id"] for r in rows[:N]} == set(items[:N])
    assert all(r["reranker_score"] is not None for r in rows[:N])
    beyond = rows[N:]
    assert [r["item_id"] for r in beyond] == items[N:]          # upstream order
    assert [r["upstream_position"] for r in beyond] == list(range(N + 1,
                                                                  len(items) + 1))
    assert all(r["reranker_score"] is None for r in beyond)
  assert report["not_reranked_rows"] == sum(len(out[l]) - N for l in long_lists)
  # --top_k counts the new rank, beyond n too.
  _rerank(run, tmp_path / "top.parquet", top_k=N + 2)
  top = pq.read_table(tmp_path / "top.parquet")
  assert max(top["rank"].to_pylist()) == N + 2
  assert not all(top["reranked"].to_pylist())


def test_rerank_metrics_table_shows_only_what_means_something(run, tmp_path):
  report = _rerank(run, tmp_path / "out.parquet")
  md = reranking.metrics_table(run.bundle, report["metrics"], str(tmp_path / "m.md"),
                               str(tmp_path / "m.csv"), "check")
  assert "±" not in md and "shuffled" not in md and "p-value" not in md
  assert "ΔN@" not in md and "t-test" not in md
  header = next(l for l in md.splitlines() if l.startswith("| backbone"))
  assert header.count("|") == md.splitlines()[-1].count("|")   # no empty cells
  assert "HR-any@" in header and "AUC" in header
  csv_header = (tmp_path / "m.csv").read_text().splitlines()[0]
  assert "p_value" not in csv_header and "shuffled" not in csv_header
  # The training tables keep both columns.
  summary = report_lib.summarize([{"backbone": "prm", "method": "dnr_g", "seed": 0,
                                   "test": report["metrics"]["reranker"]}], 6)
  full = report_lib.write_table(summary, 6, "", "", "t", write=False)
  assert "scores shuffled" in full and "paired t-test p" in full


def test_a_file_of_only_unknown_items_warns(run, tmp_path, caplog):
  table = pq.read_table(run.lists)
  items = [f"other-{i}" for i in table["item_id"].to_pylist()]
  table = table.set_column(table.schema.get_field_index("item_id"), "item_id",
                           pa.array(items))
  path = str(tmp_path / "unknown.parquet")
  pq.write_table(table, path)
  with caplog.at_level("WARNING"):
    report = _rerank(run, tmp_path / "out.parquet", lists=path)
  assert report["stats"]["unknown"]["item"] == report["rows"] - report["stats"][
      "truncated_candidates"]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("every candidate item id" in w and "unknown.parquet" in w
             for w in warnings), warnings
  caplog.clear()
  with caplog.at_level("WARNING"):
    _rerank(run, tmp_path / "out2.parquet")
  assert not any("every candidate item id" in r.getMessage() for r in caplog.records)


def _with_times(path, out, scale):
  table = pq.read_table(path)
  times = table["time"].to_numpy() * scale
  pq.write_table(table.set_column(table.schema.get_field_index("time"), "time",
                                  pa.array(times.astype(np.int64))), out)
  return out


@pytest.mark.parametrize("case", ["lists_in_ms", "interactions_in_ms", "same_unit"])
def test_lists_and_interactions_on_different_clocks_warn(run, tmp_path, caplog, case):
  lists, inter = run.lists, run.inter
  if case == "lists_in_ms":
    lists = _with_times(run.lists, str(tmp_path / "lists_ms.parquet"), 1000)
  elif case == "interactions_in_ms":
    inter = _with_times(run.inter, str(tmp_path / "inter_ms.parquet"), 1000)
  history = own_lists.InteractionHistory.load(inter, run.vocab, run.config)
  with caplog.at_level("WARNING"):
    list(own_lists.read_lists(lists, vocab=run.vocab, config=run.config,
                              history=history))
  warnings = [r.getMessage() for r in caplog.records
              if "do not overlap plausibly" in r.getMessage()]
  if case == "same_unit":
    assert not warnings
    return
  assert len(warnings) == 1, warnings                  # once, not once per chunk
  w = warnings[0]
  factor = float(re.search(r"differ by a factor of ([\d,]+)", w).group(1)
                 .replace(",", ""))
  assert 900 < factor < 1100, w
  assert os.path.basename(inter) in w
  assert "lists 1.7" in w and "interactions in" in w     # both ranges


def test_time_mismatch_rules():
  history = own_lists.InteractionHistory(
      {}, np.zeros(0), np.zeros(0, np.int32), np.zeros(0), {}, path="clicks.parquet",
      time_range=(1_000.0, 1_500.0, 2_000.0))
  assert history.time_mismatch(np.array([1_200.0, 2_500.0])) is None   # overlap
  assert history.time_mismatch(np.array([3_000.0, 4_000.0])) is None   # new lists
  assert "older than the first" in history.time_mismatch(np.array([100.0, 900.0]))
  assert "factor of 1,000" in history.time_mismatch(np.array([1.5e6, 1.5e6]))
  assert history.time_mismatch(None) is None


def test_stale_temporary_outputs_of_dead_runs_are_removed(run, tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  stale = tmp_path / f".out.parquet.tmp{int(dead.stdout)}"
  live = tmp_path / f".out.parquet.tmp{os.getppid()}"   # a process that exists
  other = tmp_path / f".other.parquet.tmp{int(dead.stdout)}"
  for p in (stale, live, other):
    p.write_bytes(b"partial")
  _rerank(run, tmp_path / "out.parquet")
  assert not stale.exists() and live.exists() and other.exists()
  assert (tmp_path / "out.parquet").exists()


def test_output_that_is_a_folder_fails_before_any_work(run, tmp_path):
  folder = tmp_path / "out"
  folder.mkdir()
  with pytest.raises(errors.ConfigError, match=r"--output=.*out is a folder"):
    # A missing lists file: the output is checked first.
    _rerank(run, folder, lists=str(tmp_path / "no_such.parquet"))
  assert os.listdir(folder) == []


@pytest.mark.parametrize("what", ["output_folder", "export_file"])
def test_rerank_binary_checks_the_outputs_before_loading(tmp_path, what):
  (tmp_path / "folder").mkdir()
  (tmp_path / "file").write_text("x")
  # The checkpoint does not exist: an output error first proves nothing was loaded.
  flags = [f"--checkpoint={tmp_path / 'no_run'}"]
  if what == "output_folder":
    flags += [f"--lists={tmp_path / 'l.parquet'}", f"--output={tmp_path / 'folder'}"]
    message = f"ConfigError: --output={tmp_path / 'folder'} is a folder"
  else:
    flags += [f"--export={tmp_path / 'file'}"]
    message = f"ConfigError: --export={tmp_path / 'file'} is an existing file"
  proc = _binary(*flags, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def _big_lists(run, path, copies):
  """The example's lists ``copies`` times over (new list ids): a run long enough to
  be stopped in the middle."""
  table = pq.read_table(run.lists)
  ids = table["list_id"].to_pylist()
  parts = [table.set_column(table.schema.get_field_index("list_id"), "list_id",
                            pa.array([f"{l}-{c}" for l in ids]))
           for c in range(copies)]
  pq.write_table(pa.concat_tables(parts), path)
  return path


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_rerank_binary_stops_cleanly_on_a_signal(run, tmp_path, signame):
  import signal  # pylint: disable=g-import-not-at-top
  lists = _big_lists(run, str(tmp_path / "big.parquet"), copies=100)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  env = child_env.jax_child_env(2)
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.rerank", f"--checkpoint={run.workdir}",
       f"--lists={lists}", f"--interactions={run.inter}",
       f"--output={out_dir / 'out.parquet'}", "--chunk_rows=100",
       "--compilation_cache="], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  seen = []
  try:
    for line in proc.stderr:          # until the first progress line
      seen.append(line)
      if "reranked " in line and "lists/s" in line:
        break
    else:
      raise AssertionError("no progress line: " + "".join(seen)[-3000:])
    proc.send_signal(getattr(signal, signame))
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    rest, stdout = proc.stderr.read(), proc.stdout.read()
    proc.wait()
    watchdog.cancel()
  finally:
    if proc.poll() is None:
      proc.kill()
  stderr = "".join(seen) + rest
  assert proc.returncode == 75, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f"Interrupted: {signame} received: reranking"), last
  assert "nothing written" in last and "not created" in last
  assert "terminate called" not in stderr and "Traceback" not in stderr
  assert "reranked 1" not in stdout                    # no summary: it stopped
  assert os.listdir(out_dir) == []                     # no output, no .tmp file


def _doc_example() -> str:
  """The code block of docs/own_lists.md that turns raw ids into the exported
  reranker's arrays (the one after its marker comment)."""
  text = open(os.path.join(ROOT, "docs", "own_lists.md")).read()
  after = text[text.index("<!-- tests/rerank_test.py runs the next code block"):]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_raw_id_example_runs_and_matches_rerank(run, tmp_path, capsys):
  exported_dir = str(tmp_path / "exported")
  serving.export_reranker(run.bundle, exported_dir)
  code = _doc_example()
  assert 'd = "/tmp/dnr_exported"' in code and "jax.export.deserialize" in code
  scope = {}
  exec(compile(code.replace('"/tmp/dnr_exported"', repr(exported_dir)),  # pylint: disable=exec-used
               "docs/own_lists.md", "exec"), scope)
  request, arrays, reranked = scope["request"], scope["arrays"], scope["reranked"]
  assert capsys.readouterr().out.strip() == str(reranked)
  # The example's ids are all known here (the test is not about unknown ids) ...
  vocab = json.load(open(os.path.join(exported_dir, "vocabulary", "vocab.json")))
  for raw in [request["user_id"], *request["history"], *request["candidates"]]:
    assert raw in vocab["columns"]["user" if raw.startswith("U") else "item"], raw
  # ... and the arrays are the reader's for the same list, written as a lists file.
  k = len(request["candidates"])
  rows = {"list_id": ["req"] * k, "user_id": [request["user_id"]] * k,
          "item_id": request["candidates"], "score": request["scores"],
          "position": list(range(k)), "history": [request["history"]] * k,
          **{c: [v] * k for c, v in request["user_features"].items()},
          **request["item_features"]}
  path = str(tmp_path / "request.parquet")
  pq.write_table(pa.table(rows), path)
  config = dataclasses.replace(run.config, lists=path, interactions=None)
  (chunk,) = own_lists.read_lists(path, vocab=run.vocab, config=config)
  for name in export.EXPORT_INPUTS:
    np.testing.assert_array_equal(arrays[name], chunk.arrays[name], err_msg=name)
  assert arrays["history_mask"][0, -1] and not arrays["history_mask"][0, 0]
  # The order is experiments.rerank's, and the checked loader agrees with the raw call.
  _rerank(run, tmp_path / "out.parquet", lists=path, interactions=None)
  out = pq.read_table(tmp_path / "out.parquet")
  assert out["item_id"].to_pylist() == reranked
  from dnr_jax.serving import exported  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(exported.load_exported(exported_dir)(arrays),
                                scope["logits"])
