"""The serving benchmarks' load helpers: headers on every request, sides in turns.

A tiny standard-library server on a free localhost port stands in for a service: it
answers 200 only when the request carries the header it expects (and, when asked,
only when the body arrived intact), so a load whose headers were dropped or whose
bodies were cut shows up as errors. These pin what is sent and in what order,
not how fast anything is.
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from benchmarks import alternate
from benchmarks import http_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r"""
import hashlib, http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  def do_POST(self):
    data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    ok = self.headers.get("X-Side") == sys.argv[2]
    if self.headers.get("X-Check") == "sha256":   # the body ends in its payload's hash
      ok = ok and hashlib.sha256(data[:-32]).digest() == data[-32:]
      if ok:
        SEEN.add(data[-32:])
    body = b"ok" if ok else b"no header"
    self.send_response(200 if ok else 400)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)
  def do_GET(self):   # how many distinct intact bodies arrived
    body = str(len(SEEN)).encode()
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)
  def log_message(self, *args):
    pass
SEEN = set()
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture
def servers():
  """Two header-checking servers: ``{name: (url, process)}``."""
  procs = {}
  try:
    for name in ("a", "b"):
      port = http_load.free_port()
      procs[name] = (f"http://127.0.0.1:{port}/",
                     subprocess.Popen([sys.executable, "-c", SERVER, str(port), name],
                                      start_new_session=True))
    for url, proc in procs.values():
      deadline = time.time() + 30
      while True:
        try:
          urllib.request.urlopen(urllib.request.Request(
              url, data=b"{}", headers={"X-Side": "?"}), timeout=1)
        except urllib.error.HTTPError:
          break   # answering (400: the wrong side)
        except OSError:
          assert proc.poll() is None and time.time() < deadline
          time.sleep(0.1)
    yield procs
  finally:
    for _, proc in procs.values():
      proc.kill()
      proc.wait()


def _state(pid, want=None):
  """The process's state letter (``T``: stopped); waits up to 2 s for ``want``, as a
  signal is delivered to every thread asynchronously."""
  deadline = time.time() + 2
  while True:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
    if want is None or state == want or time.time() > deadline:
      return state
    time.sleep(0.01)


@pytest.mark.parametrize("generator", ["aiohttp", "wrk"])
def test_measure_sends_the_given_headers_on_every_request(servers, generator):
  if generator == "aiohttp":
    pytest.importorskip("aiohttp")
  elif shutil.which("wrk") is None:
    pytest.skip("wrk is not installed")
  url = servers["a"][0]
  good = http_load.measure(url, [b"{}", b"[]"], 2, 20, 1.0, generator,
                           {"X-Side": "a", "Content-Type": "application/json"})
  assert good["errors"] == 0 and good["lists_per_s"] > 0, good
  # Without them (the default: only the JSON content type), every request is refused.
  bad = http_load.measure(url, [b"{}"], 2, 20, 1.0, generator)
  assert bad["errors"] == bad["requests"] > 0 and bad["lists_per_s"] == 0, bad


@pytest.mark.parametrize("generator", ["aiohttp", "wrk"])
def test_measure_sends_binary_bodies_intact(servers, generator):
  """Bodies of any bytes (Triton's binary tensors): newlines, NULs, lengths that
  differ, arrive whole."""
  import hashlib  # pylint: disable=g-import-not-at-top
  if generator == "aiohttp":
    pytest.importorskip("aiohttp")
  elif shutil.which("wrk") is None:
    pytest.skip("wrk is not installed")
  rng = np.random.default_rng(0)
  payloads = [b"\n", b"a\r\n\n\x00b\n", bytes(range(256)) * 3,
              rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()]
  bodies = [p + hashlib.sha256(p).digest() for p in payloads]
  url, headers = servers["a"][0], {"X-Side": "a", "X-Check": "sha256"}
  good = http_load.measure(url, bodies, 2, 40, 1.0, generator, headers)
  assert good["errors"] == 0 and good["requests"] >= len(bodies), good
  with urllib.request.urlopen(url, timeout=5) as r:
    assert int(r.read()) == len(bodies)        # every body, not one of them again
  # A body cut short fails the check: the server does look at the bytes.
  bad = http_load.measure(url, [bodies[2][1:]], 2, 20, 1.0, generator, headers)
  assert bad["errors"] == bad["requests"] > 0, bad


def test_alternate_measures_each_side_in_turn_with_a_ceiling_per_round(servers):
  pytest.importorskip("aiohttp")
  (url_a, proc_a), (url_b, proc_b) = servers["a"], servers["b"]
  sides = {"a": alternate.Side(url_a, [proc_a.pid], [b"{}"], {"X-Side": "a"}),
           "b": alternate.Side(url_b, [proc_b.pid], [b"{}"], {"X-Side": "b"},
                               stop=False)}
  seen = []

  def ceiling():
    # Every side that may be stopped is stopped while the ceiling is timed.
    seen.append((_state(proc_a.pid, "T"), _state(proc_b.pid) != "T"))
    return 1000.0

  results = alternate.alternate(sides, ceiling, rounds=2, seconds=1.0, clients=2,
                                generator="aiohttp")
  assert seen == [("T", True), ("T", True)]
  assert _state(proc_a.pid) != "T"   # running again at the end
  assert [l["round"] for l in results["a"]] == [0, 1]
  for name in ("a", "b"):
    for line in results[name]:
      assert line["side"] == name and line["errors"] == 0 and line["lists_per_s"] > 0
      assert line["cpu_ms_per_list"] >= 0
  summary = {s["side"]: s for s in alternate.medians(results)}
  assert summary["in_process"]["lists_per_s"] == 1000.0
  rates = sorted(l["lists_per_s"] for l in results["a"])
  assert summary["a"]["of_in_process"] == round(sum(rates) / 2 / 1000.0, 3)


def test_failed_beside_a_bad_one_counts_only_the_good_requests_that_failed():
  bodies = [b"good%d" % i for i in range(300)]
  assert alternate.failed_beside_a_bad_one(
      lambda b: 400 if b == b"bad" else 200, bodies, b"bad") == "0 of 300"
  # An engine that fails the whole batch: every good request fails with the bad one.
  assert alternate.failed_beside_a_bad_one(
      lambda b: 400, bodies, b"bad", tries=2, good=5) == "10 of 10"


def test_contract_compares_replies_and_the_bad_requests_answer():
  want = [{"item_ids": ["b", "a"], "scores": [0.5, 0.1]}]
  replies = {b"good": b'{"item_ids": ["b", "a"], "scores": [0.5, 0.1], "x": 1}',
             b"bad": b'{"error": "scores[0]: non-finite score nan"}'}

  def post(body):
    return (400 if body == b"bad" else 200), replies[body]

  got = alternate.contract(post, [b"good"] * 300, want, b"bad")
  assert got == {"same_replies_as_service": True,
                 "bad_request": [400, replies[b"bad"].decode()],
                 "good_failed_beside_a_bad_one": "0 of 300"}
  swapped = {b"good": b'{"item_ids": ["a", "b"], "scores": [0.1, 0.5]}',
             b"bad": replies[b"bad"]}
  got = alternate.contract(lambda b: (400 if b == b"bad" else 200, swapped[b]),
                           [b"good"] * 300, want, b"bad")
  assert got["same_replies_as_service"] is False


def test_in_process_ceiling_times_the_tiled_lists():
  class Scorer:
    batch_size = 4
    seen = []

    def score(self, arrays):
      self.seen.append(len(arrays["items"]))

  scorer = Scorer()
  ceiling = alternate.in_process_ceiling(scorer, {"items": np.zeros((3, 2))}, lists=10)
  assert scorer.seen == [4]          # compiled on one batch first
  assert ceiling() > 0 and scorer.seen == [4, 10]   # each call: all 10 lists


def test_wait_for_200_polls_until_ready_and_names_a_side_that_died():
  class Proc:
    def __init__(self, code):
      self.code = code

    def poll(self):
      return self.code

  statuses = iter([0, 503, 200])
  posted = []

  def post(body):
    posted.append(body)
    return next(statuses), b""

  alternate.wait_for_200(post, b"x", Proc(None), "a", poll_s=0)
  assert posted == [b"x"] * 3
  with pytest.raises(SystemExit, match=r"b did not start \(exit 1\)"):
    alternate.wait_for_200(lambda b: (0, b""), b"x", Proc(1), "b", poll_s=0)
  with pytest.raises(SystemExit, match=r"c did not start \(exit None\)"):
    alternate.wait_for_200(lambda b: (0, b""), b"x", Proc(None), "c", timeout_s=0,
                           poll_s=0)
