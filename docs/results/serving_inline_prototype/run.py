r"""The service's request path in one process per core (``inline_app.py``, on
uvicorn), alternated under one load with the service, with the in-process ceiling.

  python docs/results/serving_inline_prototype/run.py \
      --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 [--rounds=6] [--seconds=5] \
      [--variants=inline_1:1:64:1,inline_2:2:64:1]

Run from the repository root. A variant ``NAME:WORKERS:MAX_BATCH:DELAY_MS`` is uvicorn
with ``--workers=WORKERS`` processes (one listening socket; each process holds the
model and scores its own requests), each batch at most MAX_BATCH lists, waiting at
most DELAY_MS from its oldest request's arrival; ``...:pin`` binds each process to
a core of its own. Before the load the
driver checks, for every side against the service: the replies to 64 lists (item
order and scores), what a lone bad request (a NaN score) gets, and how many of 15
good requests sent at once with a bad one fail beside it (20 times).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from benchmarks import alternate
from benchmarks import http_load
from benchmarks import process_cpu
from benchmarks import run_requests
from benchmarks import triton_server

flags.DEFINE_string("checkpoint", "/tmp/lex/runs/prm/dnr_g/seed0", "The run served.")
flags.DEFINE_integer("rounds", 6, "Turns of each side.")
flags.DEFINE_float("seconds", 5.0, "Seconds per turn (after 1 s of warm-up).")
flags.DEFINE_integer("clients", 32, "Concurrent wrk clients.")
flags.DEFINE_list("variants", ["inline_1:1:64:1", "inline_2:2:64:1"],
                  "Arrangements, NAME:WORKERS:MAX_BATCH:DELAY_MS[:pin].")
FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))
JSON = {"Content-Type": "application/json"}
BAD = b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}'


def main(argv):
  del argv
  from dnr_jax import serving
  bundle = serving.load_bundle(FLAGS.checkpoint)
  bodies, arrays = run_requests.request_bodies(bundle, 1)
  urls, procs = {}, {}
  try:
    procs["service"], urls["service"] = alternate.start_service(FLAGS.checkpoint)
    for v in FLAGS.variants:
      name, workers, max_batch, delay_ms, *pin = v.split(":")
      port = http_load.free_port()
      env = dict(os.environ, DNR_INLINE_CHECKPOINT=FLAGS.checkpoint,
                 DNR_INLINE_MAX_BATCH=max_batch, DNR_INLINE_DELAY_MS=delay_ms,
                 PYTHONPATH=f"{ROOT}:{HERE}")
      if pin == ["pin"]:
        env["DNR_INLINE_PIN_DIR"] = tempfile.mkdtemp(prefix=f"{name}-cores-")
      procs[name] = subprocess.Popen(
          [sys.executable, "-m", "uvicorn", "--factory", "inline_app:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--workers", workers,
           "--log-level", "warning", "--no-access-log"], cwd=HERE, env=env,
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
      urls[name] = f"http://127.0.0.1:{port}/rerank"
    post = lambda url, body: triton_server.post_request(url, body, JSON)
    for name, url in urls.items():
      alternate.wait_for_200(lambda b, u=url: post(u, b), bodies[0], procs[name], name)
    for v in FLAGS.variants:
      # A worker answers once it has compiled: wait until each has answered.
      name, workers = v.split(":")[:2]
      seen, t0 = set(), time.time()
      while len(seen) < int(workers):
        if time.time() - t0 > 300:
          raise SystemExit(f"{name}: {len(seen)} of {workers} workers answered")
        with urllib.request.urlopen(urls[name].replace("/rerank", "/ready")) as r:
          seen.add(json.loads(r.read())["pid"])
    alternate.against_service(
        urls, {n: process_cpu.tree(p.pid) for n, p in procs.items()}, post, bodies,
        BAD, serving.Scorer(bundle), arrays, rounds=FLAGS.rounds,
        seconds=FLAGS.seconds, clients=FLAGS.clients)
  finally:
    process_cpu.end_sessions(procs.values())


if __name__ == "__main__":
  app.run(main)
