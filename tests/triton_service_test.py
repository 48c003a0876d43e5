"""The online service's request on Triton (experiments.serve_triton, the dnr backend).

Starts the binary on a tiny trained own-lists run and talks to it over real HTTP
from several threads at once (so requests share batches): its scores equal
experiments.rerank's for the same lists; every bad request the Python service
refuses gets the same 400 and line, alone in its batch; metrics count requests,
batches and unknown ids; SIGTERM answers the requests in flight, then exits 0.
Skipped without the serve extra, or where the backend cannot be built here (no
compiler, RapidJSON or Triton's headers); a build that fails fails.
"""

import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import pyarrow.parquet as pq
import pytest

from dnr_jax.data import own_lists
from dnr_jax.serving import rerank_files
from dnr_jax.serving.online import replay

import served_lists  # pylint: disable=g-bad-import-order  (tests/served_lists.py)
import tiny_runs  # pylint: disable=g-bad-import-order  (tests/tiny_runs.py)

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
pytest.importorskip("orjson")

from dnr_jax.serving.online import endpoint  # pylint: disable=g-import-not-at-top
from dnr_jax.serving.online import requests  # pylint: disable=g-import-not-at-top
from dnr_jax.serving.triton import build  # pylint: disable=g-import-not-at-top
from dnr_jax.serving.triton import client  # pylint: disable=g-import-not-at-top
from dnr_jax.serving.triton import server as server_lib  # pylint: disable=g-import-not-at-top
from dnr_jax.serving.triton import sources  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = tuple(jax.devices()[:2])
N, H = 10, 5
MAX_CANDIDATES = 20
# ONNX Runtime against XLA, float32.
ATOL = 1e-5


class Triton:
  """``experiments.serve_triton`` in a process of its own; stopped with SIGTERM."""

  def __init__(self, checkpoint, tmp_path, *flags):
    self.port, self.metrics_port = served_lists.free_port(), served_lists.free_port()
    self.url = f"http://127.0.0.1:{self.port}/v2/models/dnr_rerank/infer"
    self.log = open(tmp_path / f"serve_triton-{self.port}.log", "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.serve_triton", f"--checkpoint={checkpoint}",
         f"--port={self.port}", f"--metrics_port={self.metrics_port}", *flags],
        cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
      if self.proc.poll() is not None:
        raise AssertionError(f"serve_triton exited ({self.proc.returncode}): "
                             f"{open(self.log.name).read()[-3000:]}")
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready",
                                    timeout=2) as r:
          if r.status == 200:
            return
      except OSError:
        pass
      if time.time() > deadline:
        self.stop()
        raise AssertionError("serve_triton was not ready after 300 s")
      time.sleep(0.3)

  def rerank(self, body):
    """``(status, parsed reply or the error's line)``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(self.url, data=client.request_body(data),
                                 headers=client.HEADERS)
    try:
      with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.loads(client.reply_bytes(r.read(), r.headers))
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())["error"]

  def metrics(self):
    with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                timeout=10) as r:
      return r.read().decode()

  def stop(self, timeout=90):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    return self.proc.returncode


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  try:
    build.built()
    server_lib.unpacked_wheel()
  except sources.Unavailable as e:
    pytest.skip(f"the dnr backend cannot be built here: {e}")
  except RuntimeError as e:   # the wheel could not be fetched
    pytest.skip(str(e))
  return tiny_runs.own_lists_run(tmp_path_factory.mktemp("triton"), N, H, DEVICES)


@pytest.fixture(scope="module")
def triton(run, tmp_path_factory):
  t = Triton(run.run_dir, tmp_path_factory.mktemp("triton_logs"),
             "--max_batch_size=8", "--queue_delay_us=20000",
             f"--max_candidates={MAX_CANDIDATES}")
  yield t
  assert t.stop() == 0


@pytest.fixture(scope="module")
def limits(run):
  from dnr_jax import serving  # pylint: disable=g-import-not-at-top
  return requests.RequestLimits.from_bundle(serving.load_bundle(run.run_dir),
                                            MAX_CANDIDATES)


def _metric(text, name):
  for line in text.splitlines():
    if line.startswith(name + "{"):
      return float(line.rsplit(" ", 1)[1])
  raise AssertionError(f"{name} not in the metrics:\n{text}")


def test_scores_equal_experiments_rerank(run, triton, tmp_path):
  want = served_lists.rerank_scores(run, tmp_path / "reranked.parquet", DEVICES)
  bodies = served_lists.request_bodies(run)
  before = triton.metrics()
  replies = served_lists.concurrently(triton.rerank, bodies)
  worst = served_lists.assert_replies_match(bodies, replies, want, ATOL)
  assert all(reply["unknown_ids"] == 0 for _, reply in replies)
  print(f"max |triton - rerank| logit difference over {len(bodies)} lists: {worst:.2e}")
  after = triton.metrics()
  answered = (_metric(after, "nv_inference_request_success")
              - _metric(before, "nv_inference_request_success"))
  executions = (_metric(after, "nv_inference_exec_count")
                - _metric(before, "nv_inference_exec_count"))
  assert answered == len(bodies) and executions < answered   # batched


def test_candidates_past_n_and_unknown_and_integer_ids(run, triton):
  body = served_lists.request_bodies(run)[0]
  items = body["item_ids"] + [f"new{i}" for i in range(N + 3 - len(body["item_ids"]))]
  items[1] = 12345   # an integer id, unknown to the vocabulary: back as sent
  status, reply = triton.rerank({**body, "item_ids": items,
                                 "scores": [0.5] * len(items), "features": {},
                                 "history": ["nope"]})
  assert status == 200, reply
  assert reply["reranked"] == N
  assert sorted(map(str, reply["item_ids"][:N])) == sorted(map(str, items[:N]))
  assert 12345 in reply["item_ids"]
  assert reply["item_ids"][N:] == items[N:] and reply["scores"][N:] == [None] * 3
  unknown = sum(1 for i in items[:N] if isinstance(i, int) or str(i).startswith("new"))
  assert reply["unknown_ids"] == unknown + 1   # and the history's one
  assert _metric(triton.metrics(), "dnr_unknown_ids_total") >= unknown + 1


def _bad_bodies(run):
  good = served_lists.request_bodies(run)[0]
  u, i = run.vocab.user_features[0], run.vocab.item_features[0]
  k = len(good["item_ids"])
  bad = [
      {**good, "user_id": None}, {k2: v for k2, v in good.items() if k2 != "user_id"},
      {**good, "item_ids": None}, {**good, "scores": good["scores"][:-1]},
      {**good, "item_ids": [], "scores": []},
      {**good, "item_ids": [f"x{j}" for j in range(MAX_CANDIDATES + 1)],
       "scores": [0.5] * (MAX_CANDIDATES + 1), "features": {}},
      {**good, "item_ids": ["a", 3.7] + good["item_ids"][2:]},
      {**good, "item_ids": ["a", True] + good["item_ids"][2:]},
      {**good, "item_ids": ["a", ""] + good["item_ids"][2:]},
      {**good, "item_ids": ["a", "a"] + good["item_ids"][2:]},
      {**good, "item_ids": "abc"},
      {**good, "scores": [0.5, float("nan")] + good["scores"][2:]},
      {**good, "scores": [0.5, float("-inf")] + good["scores"][2:]},
      {**good, "scores": [0.5, 1.5] + good["scores"][2:]},
      {**good, "scores": [0.5, -1e-300] + good["scores"][2:]},
      {**good, "scores": [0.5, 1e20] + good["scores"][2:]},
      {**good, "scores": [0.5, "high"] + good["scores"][2:]},
      {**good, "scores": [0.5, True] + good["scores"][2:]},
      {**good, "scores": [0.5, None] + good["scores"][2:]},
      {**good, "scores": {"a": 1}},
      {"lists": [good]}, {**good, "color": "red"}, {**good, "Lists": 1},
      {**good, "history": ["a", None]}, {**good, "history": "a"},
      {**good, "history": ["h"] * (requests.MAX_HISTORY + 1)},
      {**good, "features": {u: ["1", "2"]}}, {**good, "features": {u: 1.5}},
      {**good, "features": {i: ["x"] * (k + 1)}},
      {**good, "features": {"zip": "1"}}, {**good, "features": []},
      {**good, "features": {i: [None] * k}},
      {**good, "user_id": {"nested": [1, "two", 3.0, None, False]}},
      {**good, "item_ids": ["it's \"q\"\n\t\x01\x85 é"] * 2 + good["item_ids"][2:]},
      {**good, "item_ids": ["it's"] * 2 + good["item_ids"][2:]},
      {**good, "item_ids": ["\\"] * 2 + good["item_ids"][2:]},
      {**good, "item_ids": ["a", "a'b", "a'b"] + good["item_ids"][3:]},
      {**good, "user_id": 1e-7}, {**good, "user_id": 1e22}, {**good, "user_id": -0.0},
      {**good, "user_id": 123456789.125}, {**good, "user_id": ["x" * 60]},
      [1, 2], "text", None, 7,
  ]
  # Characters Python's repr escapes: non-printable (U+00A0, U+2028, U+E0001),
  # lone surrogates; an emoji it does not.
  for text in ("a\u00a0", "\u2028\u00ad", "\U0001f600\U000e0001", "x" * 50 + "\u00a0"):
    bad.append({**good, "item_ids": [text, text] + good["item_ids"][2:]})
  raw = [b'{"user_id": "u", "item_ids": ["a"], "scores": [0.5]',
         b"not json at all", b"", b"  \n\t ", b'{"user_id": "u", "item_ids": ["a"], "scores": [0.5]} x',
         b'\xff\xfe{"user_id": 1}', b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}',
         b'{"user_id": "u", "item_ids": ["a"], "scores": [Infinity]}',
         b'{"user_id": "u", "user_id": null, "item_ids": ["a"], "scores": [0.5]}',
         b'{"user_id": {"a": 1, "b": 2, "a": 3}, "item_ids": ["a"], "scores": [0.5]}',
         b'{"user_id": "\\udc00", "item_ids": ["a"], "scores": [0.5]}',
         b'{"user_id": "u", "item_ids": ["a", "\\udfff"], "scores": [0.5, 0.5]}',
         # Nested past Python's limit, and within it (then named by the check).
         b'{"user_id": ' + b"[" * 2000 + b"]" * 2000 + b', "item_ids": ["a"], "scores": [0.5]}',
         b'{"list_id": ' + b"{\"a\": " * 3000 + b"1" + b"}" * 3000 + b', "user_id": "u"}',
         b'{"user_id": ' + b"[" * 500 + b"]" * 500 + b', "item_ids": ["a"], "scores": [0.5]}',
         b"[" * 100000,
         # Many keys: the first unknown one is named (read in one pass).
         json.dumps({f"k{j}": j for j in range(200_000)}).encode(),
         json.dumps({**good, "features": {f"f{j}": "x" for j in range(100_000)}}).encode()]
  return [json.dumps(b).encode() for b in bad] + raw


def _python_line(body, limits):
  """The service's line for ``body``, as its endpoint answers it (a blank body,
  ``read_body`` and ``check_request``); malformed JSON without its detail."""
  if not body.strip():
    return "body: missing (send one list as a JSON object)"
  # How deep Python's json reads depends on the recursion limit: the service's is
  # Python's default, which a library loaded in this test process may have raised.
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(1000)
  try:
    endpoint.read_body(body, lambda d: [requests.check_request(d, limits)])
  except requests.RequestError as e:
    return str(e)
  except ValueError:
    return "body: malformed JSON"
  except RecursionError:
    return "body: malformed JSON (nested too deeply)"
  finally:
    sys.setrecursionlimit(limit)
  raise AssertionError(f"the service takes {body[:200]!r}")


def test_every_bad_request_gets_the_services_line(run, triton, limits):
  bodies = _bad_bodies(run)
  got = served_lists.concurrently(triton.rerank, bodies)
  for body, (status, line) in zip(bodies, got):
    want = _python_line(body, limits)
    assert status == 400, (body[:200], line)
    assert "\n" not in line
    if want == "body: malformed JSON":
      assert line.startswith("body: malformed JSON ("), (body[:200], line)
    else:
      assert line == want, (body[:200], line, want)


def test_a_list_id_comes_back_as_the_service_sends_it(run, triton):
  body = json.dumps(served_lists.request_bodies(run)[0])[1:]   # without its opening brace
  for list_id, want in ((b"NaN", None), (b"-Infinity", None), (b"1.0", 1.0),
                        (b"3", 3), (b'{"a": 1, "a": [2, NaN]}', {"a": [2, None]}),
                        (b'"\\udc00"', "\udc00")):
    sent = b'{"list_id": ' + list_id + b", " + body.encode().replace(
        b'"list_id": "req-000000", ', b"")
    status, reply = triton.rerank(sent)
    assert status == 200, (list_id, reply)
    assert reply["list_id"] == want and type(reply["list_id"]) is type(want), (
        list_id, reply["list_id"])


def test_what_rapidjson_reads_otherwise_still_gets_a_400(triton):
  good = '"user_id": "u", "item_ids": ["a"]'
  for body in (b'{' + good.encode() + b', "scores": [1e400]}',
               b'{"user_id": "\\ud800", "item_ids": ["a"], "scores": [0.5]}',
               b'{"user_id": 123456789012345678901234567890, "item_ids": ["a"], '
               b'"scores": [0.5]}'):
    status, line = triton.rerank(body)
    assert status == 400 and "\n" not in line, (body, line)


def test_a_bad_request_never_fails_the_others_in_its_batch(run, triton):
  bodies = served_lists.request_bodies(run)[:48]
  bad = json.dumps({**bodies[0], "scores": [math.inf] * len(bodies[0]["scores"])},
                   allow_nan=True).encode()
  mixed = [b if j % 4 else bad for j, b in enumerate(bodies)]
  got = served_lists.concurrently(triton.rerank, mixed, workers=24)
  for body, (status, reply) in zip(mixed, got):
    if body is bad:
      assert (status, reply) == (400, "scores[0]: non-finite score inf")
    else:
      assert status == 200 and reply["list_id"] == body["list_id"], reply


def test_sigterm_answers_the_requests_in_flight(run, tmp_path):
  t = Triton(run.run_dir, tmp_path, "--max_batch_size=4", "--queue_delay_us=200000",
             f"--max_candidates={MAX_CANDIDATES}")
  bodies = served_lists.request_bodies(run)[:12]
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    sent = [pool.submit(t.rerank, b) for b in bodies]
    time.sleep(0.1)   # in Triton's queue: each batch waits up to 200 ms
    assert t.stop() == 0
    assert [f.result()[0] for f in sent] == [200] * len(bodies)


@pytest.mark.parametrize("flag, words", [
    ("--port=80", "ConfigError: port=80 must be in 1024..65535"),
    ("--intra_op_threads=-1", "ConfigError: intra_op_threads=-1 must be >= 0"),
    ("--instances=0", "ConfigError: instances=0 must be in 1..64"),
])
def test_a_bad_flag_is_one_line_before_anything_starts(run, flag, words):
  got = subprocess.run([sys.executable, "-m", "experiments.serve_triton",
                        f"--checkpoint={run.run_dir}", flag], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert got.returncode == 2 and got.stderr.strip().splitlines()[-1].startswith(words), (
      got.stderr[-2000:])


def test_serving_benchmark_measures_the_triton_engine(run):
  pytest.importorskip("aiohttp")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.serving", f"--checkpoint={run.run_dir}",
       "--engine=triton", "--levels=1,4", "--requests_per_level=40",
       "--seconds_per_level=10", "--warmup=4", "--max_batch_size=8",
       "--scorer_lists=64"], cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  levels = [l for l in lines if "clients" in l]
  assert [l["clients"] for l in levels] == [1, 4]
  for l in levels:
    assert l["engine"] == "triton" and l["errors"] == 0 and l["requests"] == 40
    assert l["lists_per_s"] > 0 and l["mean_batch"] >= 1
  assert lines[-2]["what"] == "in-process scorer"
  assert lines[-1]["what"] == "of the in-process rate"
  # No --batch_timeout_ms: the engine's own queue delay (recorded as null).
  (ready,) = [l for l in lines if l.get("what") == "service ready"]
  assert ready["batch_timeout_ms"] is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_lost_in_a_finalizer_still_stops_the_start(monkeypatch):
  """SIGTERM whose handler runs inside a finalizer during the export: Python drops
  the handler's exception there, and the server must still not start."""
  import gc  # pylint: disable=g-import-not-at-top
  from dnr_jax import errors  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.triton import service  # pylint: disable=g-import-not-at-top

  class Finalized:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)    # the handler runs here, and its exception is dropped

  def prepare(config, folder, log):
    del config, folder, log
    Finalized()
    gc.collect()
    return ["tritonserver"], {}

  def popen(*args, **kwargs):
    del args, kwargs
    pytest.fail("the server was started after SIGTERM")

  monkeypatch.setattr(service, "prepare", prepare)
  monkeypatch.setattr(service.subprocess, "Popen", popen)
  with pytest.raises(errors.Interrupted, match="SIGTERM before Triton started"):
    service.serve(service.TritonServiceConfig(checkpoint="x"), log=lambda line: None)


def test_every_entry_point_has_the_same_default_queue_delay():
  """The binary's flag, the typed config and the repository's config.pbtxt agree on
  the measured default (docs/serving_triton.md, "What moved the rate")."""
  from dnr_jax.serving.triton import repository  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.triton import service  # pylint: disable=g-import-not-at-top
  default = repository.DEFAULT_QUEUE_DELAY_US
  # The binary's flags in a process of their own (absl's flags are global).
  got = subprocess.run([sys.executable, "-m", "experiments.serve_triton", "--helpfull"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  text = got.stdout + got.stderr
  assert "--queue_delay_us: How long" in text, text[-2000:]
  after = text[text.index("--queue_delay_us: How long"):]
  assert f"(default: '{default}')" in after.split("(an integer)")[0]
  assert service.TritonServiceConfig(checkpoint="x").queue_delay_us == default
  assert f"max_queue_delay_microseconds: {default} " in repository.config()
  assert 0 < default < 1000


def test_a_run_on_logits_is_served_with_the_sigmoid_transform(tmp_path_factory, run):
  del run   # skips with it where the backend cannot be built
  root = tmp_path_factory.mktemp("triton_sigmoid")
  logits_run = tiny_runs.own_lists_run(root, N, H, DEVICES, score_transform="sigmoid")
  out = root / "reranked.parquet"
  rerank_files.rerank_file(logits_run.bundle, logits_run.lists, str(out),
                           interactions=logits_run.inter, devices=DEVICES)
  table = pq.read_table(out).filter(pq.read_table(out)["reranked"]).to_pydict()
  want = {(l, i): s for l, i, s in zip(table["list_id"], table["item_id"],
                                       table["reranker_score"])}
  history = own_lists.InteractionHistory.load(logits_run.inter, logits_run.vocab,
                                              logits_run.config)
  chunk = next(iter(own_lists.read_lists(logits_run.lists, vocab=logits_run.vocab,
                                         config=logits_run.config, history=history)))
  bodies = replay.request_bodies(chunk, logits_run.vocab, "sigmoid")[:24]
  t = Triton(logits_run.run_dir, root)
  try:
    for body, (status, reply) in zip(bodies, served_lists.concurrently(t.rerank, bodies)):
      assert status == 200, reply
      for item, score in zip(reply["item_ids"], reply["scores"]):
        assert abs(score - want[(body["list_id"], item)]) <= ATOL
    # Logits outside [0, 1] are scores here, not an error.
    status, reply = t.rerank({**bodies[0], "scores": [3.5] * len(bodies[0]["scores"])})
    assert status == 200, reply
  finally:
    assert t.stop() == 0


def test_sigterm_before_triton_starts_is_one_line_and_leaves_nothing(run, tmp_path):
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.serve_triton", f"--checkpoint={run.run_dir}",
       f"--port={served_lists.free_port()}", "--metrics_port=0"], cwd=ROOT,
      env=dict(os.environ, TMPDIR=str(scratch)), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  lines = []
  try:
    for line in proc.stdout:   # until the export starts (it takes seconds)
      lines.append(line)
      if "exporting the reranker" in line:
        break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
  finally:   # a failure must not leave a server behind (Triton dies with its parent)
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 75, "".join(lines) + rest
  assert rest.strip().splitlines()[-1].startswith(
      "Interrupted: SIGTERM before Triton started"), rest[-2000:]
  assert not [p for p in scratch.iterdir() if p.name.startswith("dnr_triton_")]
