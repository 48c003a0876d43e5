"""The online service (experiments.serve) over real HTTP on a free localhost port.

Starts the binary on a tiny trained own-lists run and talks to it with the standard
library's HTTP client from several threads at once (so requests share batches):
its scores equal experiments.rerank's for the same lists; a bad request in a batch
gets its 400 and the others their replies; health, readiness and metrics answer;
SIGTERM answers the requests in flight, then exits 0. Skipped without the serve
extra (pip install -e ".[serve]").
"""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest


import served_lists  # pylint: disable=g-bad-import-order  (tests/served_lists.py)
import tiny_runs  # pylint: disable=g-bad-import-order  (tests/tiny_runs.py)

pytest.importorskip("litserve")
pytest.importorskip("prometheus_client")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = tuple(jax.devices()[:2])
N, H = 10, 5
MAX_CANDIDATES = 20
# The service scores with batch shapes of its own (powers of two on one device),
# rerank with the run's evaluation batch on DEVICES: float32 rounding may differ.
ATOL = 1e-5


def _call(url, body=None, timeout=60):
  """``(status, parsed JSON or text)`` of a GET (no body) or a POST."""
  data = None
  if body is not None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      status, text = r.status, r.read().decode()
  except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
  try:
    return status, json.loads(text)
  except ValueError:
    return status, text


class Service:
  """``experiments.serve`` in a process of its own; stopped with SIGTERM."""

  def __init__(self, checkpoint, tmp_path, *flags):
    self.port = served_lists.free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = open(tmp_path / f"serve-{self.port}.log", "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.serve", f"--checkpoint={checkpoint}",
         f"--port={self.port}", *flags], cwd=ROOT, stdout=self.log,
        stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while True:
      if self.proc.poll() is not None:
        raise AssertionError(f"the service exited ({self.proc.returncode}): "
                             f"{open(self.log.name).read()[-3000:]}")
      try:
        if _call(self.url + "/ready", timeout=2)[0] == 200:
          return
      except OSError:
        pass
      if time.time() > deadline:
        self.stop()
        raise AssertionError("the service was not ready after 240 s")
      time.sleep(0.3)

  def rerank(self, body):
    return _call(self.url + "/rerank", body)

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
  return tiny_runs.own_lists_run(tmp_path_factory.mktemp("online"), N, H, DEVICES)


@pytest.fixture(scope="module")
def service(run, tmp_path_factory):
  s = Service(run.run_dir, tmp_path_factory.mktemp("online_logs"),
              "--max_batch_size=8", "--batch_timeout_ms=20",
              f"--max_candidates={MAX_CANDIDATES}")
  yield s
  assert s.stop() == 0


def test_scores_equal_experiments_rerank(run, service, tmp_path):
  want = served_lists.rerank_scores(run, tmp_path / "reranked.parquet", DEVICES)
  bodies = served_lists.request_bodies(run)
  replies = served_lists.concurrently(service.rerank, bodies)
  worst = served_lists.assert_replies_match(bodies, replies, want, ATOL)
  print(f"max |service - rerank| logit difference over {len(bodies)} lists: {worst:.2e}")
  # The requests were batched (the dynamic batcher put several into one batch).
  status, text = _call(service.url + "/metrics")
  assert status == 200
  count = float(_metric(text, "dnr_batch_size_count"))
  scored = _scored_by_worker(text)
  assert list(scored) == ["0"]                    # one worker (the default)
  assert scored["0"] >= len(bodies) and count < scored["0"]


def _metric(text, name, labels=""):
  for line in text.splitlines():
    if line.startswith(name + labels + " "):
      return line.rsplit(" ", 1)[1]
  raise AssertionError(f"{name}{labels} not in /metrics:\n{text}")


def _scored_by_worker(text):
  """``{worker: lists scored}`` from /metrics."""
  prefix = 'dnr_lists_scored_total{worker="'
  return {line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
          for line in text.splitlines() if line.startswith(prefix)}


def _cores_of(pid):
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("Cpus_allowed_list:"):
        return line.split(":", 1)[1].strip()
  raise AssertionError(f"no Cpus_allowed_list for {pid}")


def test_two_workers_share_the_queue_and_stop_cleanly(run, service, tmp_path):
  # With a core of its own for each where the machine has two.
  pinned = len(os.sched_getaffinity(0)) >= 2
  s = Service(run.run_dir, tmp_path, "--workers=2", "--max_batch_size=4",
              "--batch_timeout_ms=5", f"--max_candidates={MAX_CANDIDATES}",
              *(["--worker_cores=1"] if pinned else []))
  try:
    assert _call(s.url + "/info")[1]["server"]["workers_per_device"] == 2
    if pinned:
      everyone = _cores_of(s.proc.pid)
      children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(s.proc.pid)],
                                capture_output=True, text=True).stdout.split()
      own = sorted(c for c in map(_cores_of, children) if c != everyone)
      # The two workers, on the two highest cores; the HTTP process on every core.
      top = sorted(os.sched_getaffinity(0))[-2:]
      assert own == [str(c) for c in top], (own, everyone)
    bodies = served_lists.request_bodies(run)
    want = {b["list_id"]: r for b, (_, r) in zip(
        bodies, served_lists.concurrently(service.rerank, bodies))}
    # More lists at once than one batch holds: while one worker scores a batch, the
    # other gathers the next. (Rounds until both have scored, as a guard against a
    # machine slow enough that one worker keeps up alone.)
    for _ in range(5):
      for body, (status, reply) in zip(bodies, served_lists.concurrently(s.rerank, bodies)):
        assert status == 200, reply
        expected = want[body["list_id"]]
        assert reply["item_ids"] == expected["item_ids"]
        np.testing.assert_allclose(reply["scores"], expected["scores"], atol=ATOL)
      scored = _scored_by_worker(_call(s.url + "/metrics")[1])
      if len(scored) == 2 and min(scored.values()) > 0:
        break
    assert sorted(scored) == ["0", "1"] and min(scored.values()) > 0, scored
  finally:
    assert s.stop() == 0


BAD = [
    (b'{"user_id": "u", "item_ids": ["a"], "scores": [0.5]', "body: malformed JSON"),
    (b"not json at all", "body: malformed JSON"),
    ({"item_ids": ["a"], "scores": [0.5]}, "user_id: missing"),
    ({"user_id": "u", "item_ids": ["a", "b"], "scores": [0.5]},
     "scores: 1 scores for 2 item_ids"),
    (b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}',
     "scores[0]: non-finite score nan"),
    ({"user_id": "u", "item_ids": ["a"], "scores": [7.0]}, "scores[0]: 7 is outside"),
    ({"user_id": "u", "item_ids": [f"x{i}" for i in range(MAX_CANDIDATES + 1)],
      "scores": [0.5] * (MAX_CANDIDATES + 1)}, "item_ids: 21 candidates, more than"),
    ({"user_id": "u", "item_ids": [1.5], "scores": [0.5]}, "item_ids[0]: an id is"),
]


def _post_too_large(url, tries=5):
  """``_call`` with a 4 MiB body. The service answers 413 and closes before the
  rest of the body is read (uvicorn does not linger), so a client still sending may
  meet a reset and never read the reply, more often on a loaded machine: try again."""
  for _ in range(tries - 1):
    try:
      return _call(url, b" " * (4 << 20))
    except (ConnectionResetError, BrokenPipeError, urllib.error.URLError) as e:
      if isinstance(e, urllib.error.URLError) and not isinstance(
          e.reason, (ConnectionResetError, BrokenPipeError)):
        raise
  return _call(url, b" " * (4 << 20))


def test_bad_requests_get_400_and_never_fail_their_batch(run, service):
  good = served_lists.request_bodies(run)[:24]
  alone = [service.rerank(b) for b in good[:4]]
  mixed = good[:12] + [b for b, _ in BAD] + good[12:]
  # A barrier so that good and bad requests reach the batcher together.
  barrier = threading.Barrier(len(mixed))

  def send(body):
    barrier.wait()
    return service.rerank(body)

  answers = served_lists.concurrently(send, mixed, workers=len(mixed))
  bad_answers = answers[12:12 + len(BAD)]
  good_answers = answers[:12] + answers[12 + len(BAD):]
  for (status, reply), (_, words) in zip(bad_answers, BAD):
    assert status == 400, reply
    assert set(reply) == {"error"} and reply["error"].startswith(words), reply
    assert "\n" not in reply["error"]
  assert all(status == 200 for status, _ in good_answers)
  for (_, reply), (_, before) in zip(good_answers[:4], alone):
    assert reply["item_ids"] == before["item_ids"]
    np.testing.assert_allclose(reply["scores"], before["scores"], atol=ATOL)
  # Too large a body (413, before parsing) and another method (405) over real HTTP.
  status, reply = _post_too_large(service.url + "/rerank")
  assert status == 413 and reply["error"].startswith("body: larger than"), reply
  assert _call(service.url + "/rerank")[0] == 405
  # The server is still up, and counted the errors.
  assert _call(service.url + "/healthz")[0] == 200
  assert _call(service.url + "/ready")[0] == 200
  text = _call(service.url + "/metrics")[1]
  assert float(_metric(text, "dnr_request_errors_total",
                             '{code="400",path="/rerank"}')) >= len(BAD)
  assert float(_metric(text, "dnr_request_errors_total",
                             '{code="413",path="/rerank"}')) >= 1


def test_unknown_ids_and_candidates_past_n(run, service):
  known = run.vocab.columns["item"][:N + 2]
  body = {"user_id": "someone-new", "item_ids": known + ["new-a", "new-b"],
          "scores": [0.5] * (N + 4), "history": ["never-seen", known[0]],
          "list_id": 5}
  text0 = _call(service.url + "/metrics")[1]
  status, reply = service.rerank(body)
  assert status == 200, reply
  assert reply["reranked"] == N and reply["list_id"] == 5
  # Past n: upstream order, no score.
  assert reply["item_ids"][N:] == body["item_ids"][N:]
  assert reply["scores"][N:] == [None] * 4
  assert sorted(reply["item_ids"][:N]) == sorted(body["item_ids"][:N])
  # The new user and the unseen history item (the new items are past n, unread).
  assert reply["unknown_ids"] == 2
  text1 = _call(service.url + "/metrics")[1]
  for column in ("user", "history"):
    before = float(_metric(text0, "dnr_unknown_ids_total", f'{{column="{column}"}}')
                   if f'column="{column}"' in text0 else 0)
    assert float(_metric(text1, "dnr_unknown_ids_total",
                         f'{{column="{column}"}}')) == before + 1
  assert "dnr_request_latency_seconds_bucket" in text1


def test_several_lists_in_one_request_get_what_each_gets_alone(run, service):
  # 12 lists, more than a batch (8) holds: the worker scores them in two batches or
  # more, with whatever else is queued.
  bodies = served_lists.request_bodies(run)[30:42]
  alone = [service.rerank(b) for b in bodies]
  status, reply = _call(service.url + "/rerank_lists", {"lists": bodies})
  assert status == 200, reply
  assert len(reply["results"]) == len(bodies)
  for got, (code, want) in zip(reply["results"], alone):
    assert code == 200 and got["list_id"] == want["list_id"]
    assert got["item_ids"] == want["item_ids"]
    np.testing.assert_allclose(got["scores"], want["scores"], atol=ATOL)
  status, reply = _call(service.url + "/rerank_lists",
                        {"lists": bodies[:2] + [dict(bodies[2], scores=[2.0])]})
  assert status == 400 and reply["error"].startswith("lists[2].scores: 1 scores")
  text = _call(service.url + "/metrics")[1]
  assert float(_metric(text, "dnr_requests_total",
                       '{code="200",path="/rerank_lists"}')) >= 1
  assert float(_metric(text, "dnr_request_errors_total",
                       '{code="400",path="/rerank_lists"}')) >= 1


def test_a_long_reply_is_not_compressed(run, service):
  # LitServe would gzip a reply past 1,000 bytes for a client that accepts it; the
  # service leaves GZip out (server.PipeQueueServer._register_middleware).
  body = {"user_id": "u", "item_ids": run.vocab.columns["item"][:N],
          "scores": [0.5] * N, "list_id": "L" * 2000}
  req = urllib.request.Request(
      service.url + "/rerank", data=json.dumps(body).encode(),
      headers={"Content-Type": "application/json", "Accept-Encoding": "gzip"})
  with urllib.request.urlopen(req, timeout=60) as r:
    encoding, raw = r.headers.get("Content-Encoding"), r.read()
  assert encoding is None and len(raw) > 2000
  assert json.loads(raw)["list_id"] == "L" * 2000


def test_sigterm_answers_the_requests_in_flight_then_exits_0(run, tmp_path):
  # A long batch timeout keeps the requests waiting in the batcher when SIGTERM comes.
  s = Service(run.run_dir, tmp_path, "--max_batch_size=32", "--batch_timeout_ms=1500")
  bodies = served_lists.request_bodies(run)[:12]
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    futures = [pool.submit(s.rerank, b) for b in bodies]
    time.sleep(0.5)
    assert not any(f.done() for f in futures)
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Draining: a new connection is refused at once, not queued unanswered.
    with pytest.raises(ConnectionRefusedError):
      socket.create_connection(("127.0.0.1", s.port), timeout=5).close()
    answers = [f.result(timeout=60) for f in futures]
  assert [status for status, _ in answers] == [200] * len(bodies)
  assert s.stop() == 0 and time.time() - t0 < 30
  log = open(s.log.name).read()
  assert "SIGTERM: draining" in log and "stopped" in log
  # Nothing listens any more.
  with pytest.raises(OSError):
    urllib.request.urlopen(s.url + "/healthz", timeout=2)


def _blocked_signals(pid, tid):
  with open(f"/proc/{pid}/task/{tid}/status") as f:
    mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
  return {s for s in (signal.SIGTERM, signal.SIGINT) if mask >> (s - 1) & 1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_only_the_main_thread_can_take_the_drain_signal(service):
  # A SIGTERM taken by another thread of the main process would be handled only when
  # the main thread, blocked waiting for the shutdown, next woke: never (seen with a
  # SIGTERM sent just after a SIGCONT). Every other thread blocks both signals.
  pid = service.proc.pid
  deadline = time.time() + 10   # the thread starts just after the HTTP process
  while len(threads := [int(t) for t in os.listdir(f"/proc/{pid}/task")]) < 2:
    assert time.time() < deadline, "LitServe's monitoring thread never started"
    time.sleep(0.1)
  assert _blocked_signals(pid, pid) == set()
  for tid in threads:
    if tid != pid:
      assert _blocked_signals(pid, tid) == {signal.SIGTERM, signal.SIGINT}, tid


def test_a_bad_checkpoint_fails_in_one_line_before_any_process_starts(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.serve", f"--checkpoint={tmp_path}/none",
       f"--port={served_lists.free_port()}"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 4
  assert proc.stderr.strip().splitlines()[-1].startswith("CheckpointError: --checkpoint=")


def test_a_port_in_use_fails_in_one_line_before_any_process_starts(run):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.serve", f"--checkpoint={run.run_dir}",
         f"--port={port}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"ConfigError: port={port}: cannot listen on 127.0.0.1"), last
  assert "inference worker" not in proc.stderr


def test_more_worker_cores_than_the_machine_fails_in_one_line(run):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.serve", f"--checkpoint={run.run_dir}",
       f"--port={served_lists.free_port()}", "--worker_cores=4096"], cwd=ROOT,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("ConfigError: worker_cores=4096 with workers=1: needs 4096 "
                         "cores of their own"), last
  assert "inference worker" not in proc.stderr


def _json_lines(text):
  return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


@pytest.mark.parametrize("lists_per_request, levels", [(1, [1, 4]), (3, [4])])
def test_serving_benchmark_prints_a_line_per_level(run, lists_per_request, levels):
  pytest.importorskip("aiohttp")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.serving", f"--checkpoint={run.run_dir}",
       f"--levels={','.join(map(str, levels))}", "--requests_per_level=40",
       "--seconds_per_level=10", "--warmup=4", "--max_batch_size=8",
       "--scorer_lists=64", f"--lists_per_request={lists_per_request}"],
      cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _json_lines(proc.stdout)
  levels_run = [l for l in lines if "clients" in l]
  assert [l["clients"] for l in levels_run] == levels
  for l in levels_run:
    assert l["errors"] == 0 and l["requests"] == 40 and l["lists_per_s"] > 0
    assert l["lists_per_request"] == lists_per_request
    assert 0 < l["p50_ms"] <= l["p95_ms"] <= l["p99_ms"] and l["mean_batch"] >= 1
  ceiling = lines[-2]
  assert ceiling["what"] == "in-process scorer" and ceiling["lists_per_s"] > 0
  assert lines[-1]["what"] == "of the in-process rate"
  assert lines[-1]["by_clients"] == {
      str(l["clients"]): round(l["lists_per_s"] / ceiling["lists_per_s"], 3)
      for l in levels_run}


def test_ab_benchmark_alternates_two_checkouts(run):
  pytest.importorskip("aiohttp")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.serving_ab", f"--before={ROOT}",
       f"--after={ROOT}", f"--checkpoint={run.run_dir}", "--rounds=2",
       "--seconds=1", "--clients=2", "--load_generator=aiohttp",
       "--serve_flags=--max_batch_size=4", "--after_flags=--worker_cores=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _json_lines(proc.stdout)
  turns, (summary,) = lines[:-1], lines[-1:]
  # A B, then B A: each side measured in both positions.
  assert [l["side"] for l in turns] == ["before", "after", "after", "before"]
  for l in turns:
    assert l["errors"] == 0 and l["lists_per_s"] > 0 and l["cpu_ms_per_list"] > 0
  assert summary["what"] == "medians" and summary["after_over_before"] > 0


@pytest.mark.parametrize("engine,load", [("litserve", "aiohttp"), ("uvicorn", "wrk"),
                                         ("mosec", "aiohttp"), ("triton", "aiohttp")])
def test_engine_benchmark_measures_an_engine(engine, load):
  pytest.importorskip("aiohttp")
  if engine == "mosec":
    pytest.importorskip("mosec")   # the engines extra
  if engine == "triton":
    from benchmarks import triton_server  # pylint: disable=g-import-not-at-top
    try:   # the server's binaries come in a wheel that pip downloads
      triton_server.unpacked_wheel(triton_server.DEFAULT_DIR)
    except RuntimeError as e:
      pytest.skip(str(e))
  if load == "wrk" and shutil.which("wrk") is None:
    pytest.skip("wrk is not installed")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.serving_engines", f"--engines={engine}",
       "--clients=4", "--requests=40", f"--load_generator={load}",
       "--seconds=10" if load == "aiohttp" else "--seconds=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = _json_lines(proc.stdout)
  assert (line["engine"], line["load"], line["errors"]) == (engine, load, 0), line
  assert line["p99_ms"] >= line["p95_ms"] >= line["p50_ms"] > 0
  # aiohttp stops at --requests; wrk runs for --seconds.
  assert line["requests"] == 40 if load == "aiohttp" else line["requests"] > 40


def test_onnx_scoring_benchmark_compares_onnx_runtime_with_the_jax_scorer(run):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.onnx_scoring", f"--checkpoint={run.run_dir}",
       "--lists=40", "--batch_sizes=1,16,64", "--rounds=2", "--traced"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  head, *lines = _json_lines(proc.stdout)
  assert head["what"] == "exported" and "items" in head["inputs"]
  # The simplified graph's nodes, as traced (with the one-node layer norm), and the
  # --traced side's graph (flax's layer-norm formula).
  assert head["graph"]["nodes"] < head["graph"]["traced_nodes"] < head["traced_nodes"]
  assert [l["batch_size"] for l in lines] == [1, 16, 64]
  # 40 lists: every one at batch 1, the two full batches of 16, one short batch of 64.
  assert [l["lists"] for l in lines] == [40, 32, 40]
  for l in lines:
    assert l["onnx_runtime_lists_per_s"] > 0 and l["jax_scorer_lists_per_s"] > 0
    assert l["traced_lists_per_s"] > 0 and l["simplified_over_traced"] > 0
    assert l["max_abs_diff"] < 1e-4 and l["traced_max_abs_diff"] < 1e-4, l


def test_the_endpoint_answers_in_front_of_the_middleware_stack(run):
  from dnr_jax.serving.online import endpoint  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.online import service  # pylint: disable=g-import-not-at-top
  server, _ = service.build_server(
      service.ServiceConfig(checkpoint=run.run_dir, port=served_lists.free_port()),
      log=lambda line: None)
  stack = server.app.build_middleware_stack()
  assert isinstance(stack, endpoint.RerankEndpoint)
  # Everything else still goes through Starlette's stack (errors, LitServe's routes).
  assert type(stack.app).__name__ == "ServerErrorMiddleware"


def test_worker_cores_are_the_highest_and_distinct():
  from dnr_jax.serving.online import api  # pylint: disable=g-import-not-at-top
  assert api.worker_cores({0, 1, 2, 3}, 0, 1) == [3]
  assert api.worker_cores({0, 1, 2, 3}, 1, 1) == [2]
  assert api.worker_cores([5, 2, 7, 3], 0, 2) == [5, 7]
  assert api.worker_cores([5, 2, 7, 3], 1, 2) == [2, 3]
  with pytest.raises(ValueError, match="only 4 core"):
    api.worker_cores(range(4), 2, 2)


def test_service_config_refuses_what_would_misbehave(monkeypatch):
  from dnr_jax import errors  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.online import service  # pylint: disable=g-import-not-at-top
  for bad, words in (({"batch_timeout_ms": -1}, "must be >= 0"),
                     ({"batch_timeout_ms": float("nan")}, "must be >= 0"),
                     ({"batch_timeout_ms": 30000}, "below request_timeout_s"),
                     ({"max_batch_size": 48}, "power of two"),
                     ({"port": 80}, "1024..65535"),
                     ({"workers": 0}, "1..64"),
                     ({"worker_cores": -1}, "must be >= 0"),
                     ({"worker_cores": 4096}, "needs 4096 cores of their own"),
                     ({"host": "10.0.0.1"}, "LitServe listens")):
    with pytest.raises(errors.ConfigError, match=words):
      service.ServiceConfig(checkpoint="x", **bad).validate()
  monkeypatch.setenv("LIT_SERVER_API_KEY", "secret")
  with pytest.raises(errors.ConfigError, match="no authentication"):
    service.build_server(service.ServiceConfig(checkpoint="x"))


def test_a_worker_that_cannot_start_fails_in_one_line(run, tmp_path):
  # A JAX platform that is not there: the main process never starts JAX, the worker
  # does, and fails while setting up.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.serve", f"--checkpoint={run.run_dir}",
       f"--port={served_lists.free_port()}"], cwd=ROOT, capture_output=True, text=True,
      timeout=180, env={**os.environ, "JAX_PLATFORMS": "tpu"})
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("DNRError: an inference worker failed while loading"), last
