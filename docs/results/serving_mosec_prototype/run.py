r"""The service and mosec prototypes, alternated under one load, with the ceiling.

  python docs/results/serving_mosec_prototype/run.py \
      --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 [--rounds=6] [--seconds=5]

Run from the repository root, with mosec installed (``pip install mosec==0.9.8``).
Starts ``experiments.serve`` and each mosec arrangement in ``--variants`` (see
``mosec_app.py``) on free localhost ports, checks that each answers the same
replies for 64 lists, then in each round drives each in turn from ``--clients``
wrk clients for ``--seconds`` (the others stopped with SIGSTOP, as in
``benchmarks.serving_ab``), and times the in-process scorer (every service
stopped). Prints one JSON line per turn, then the medians per side, each also as a
fraction of the in-process rate.
"""

import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

from absl import app, flags
import numpy as np

# The repository root, for ``benchmarks`` and ``dnr_jax`` (run as a script).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from benchmarks import http_load
from benchmarks import process_cpu
from benchmarks import run_requests

flags.DEFINE_string("checkpoint", "/tmp/lex/runs/prm/dnr_g/seed0", "The run served.")
flags.DEFINE_integer("rounds", 6, "Turns of each side.")
flags.DEFINE_float("seconds", 5.0, "Seconds per turn (after 1 s of warm-up).")
flags.DEFINE_integer("clients", 32, "Concurrent wrk clients.")
flags.DEFINE_list("variants", ["two_stage:2:1:64", "one_stage:1:2:64",
                               "one_stage_b16:1:2:16"],
                  "mosec arrangements, NAME:STAGES:SCORE_WORKERS:MAX_BATCH.")
FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))


def _post(url, body):
  req = urllib.request.Request(url, data=body,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=5) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()
  except OSError:
    return 0, b""


BAD = b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}'


def _beside_bad(url, bodies, tries=20, good=15):
  """Of ``good`` good requests sent at once with a bad one (``tries`` times), how
  many got anything but 200: those batched with the bad one, where a batch has one
  status."""
  failed = 0
  with concurrent.futures.ThreadPoolExecutor(good + 1) as pool:
    for t in range(tries):
      sent = [pool.submit(_post, url, b) for b in bodies[t * good:(t + 1) * good]]
      pool.submit(_post, url, BAD)
      failed += sum(f.result()[0] != 200 for f in sent)
  return f"{failed} of {tries * good}"


def main(argv):
  del argv
  from dnr_jax import serving
  bundle = serving.load_bundle(FLAGS.checkpoint)
  bodies, arrays = run_requests.request_bodies(bundle, 1)
  sides, procs = {}, {}
  try:
    port = http_load.free_port()
    procs["service"] = subprocess.Popen(
        [sys.executable, "-m", "experiments.serve", f"--checkpoint={FLAGS.checkpoint}",
         f"--port={port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    sides["service"] = f"http://127.0.0.1:{port}/rerank"
    for v in FLAGS.variants:
      name, stages, workers, max_batch = v.split(":")
      port = http_load.free_port()
      env = dict(os.environ, DNR_CHECKPOINT=FLAGS.checkpoint, DNR_STAGES=stages,
                 DNR_SCORE_WORKERS=workers, DNR_MAX_BATCH=max_batch, DNR_WAIT_MS="1",
                 PYTHONPATH=ROOT)
      procs[name] = subprocess.Popen(
          [sys.executable, os.path.join(HERE, "mosec_app.py"), "--port", str(port),
           "--address", "127.0.0.1", "--log-level", "error"], env=env,
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
      sides[name] = f"http://127.0.0.1:{port}/inference"
    for name, url in sides.items():
      t0 = time.time()
      while _post(url, bodies[0])[0] != 200:
        if procs[name].poll() is not None or time.time() - t0 > 300:
          raise SystemExit(f"{name} did not start (exit {procs[name].poll()})")
        time.sleep(0.5)
    want = [json.loads(_post(sides["service"], b)[1]) for b in bodies[:64]]
    for name, url in sides.items():
      got = [json.loads(_post(url, b)[1]) for b in bodies[:64]]
      same = all(g["item_ids"] == w["item_ids"] and g["scores"] == w["scores"]
                 for g, w in zip(got, want))
      bad = _post(url, BAD)
      print(json.dumps({"side": name, "same_replies_as_service": same,
                        "bad_request": [bad[0], bad[1].decode()[:120]],
                        "good_failed_beside_a_bad_one": _beside_bad(url, bodies)}),
            flush=True)
    trees = {name: process_cpu.tree(p.pid) for name, p in procs.items()}
    scorer = serving.Scorer(bundle)
    n = 8192
    reps = -(-n // len(arrays["items"]))
    big = {k: np.concatenate([v] * reps)[:n] for k, v in arrays.items()}
    scorer.score({k: v[:scorer.batch_size] for k, v in big.items()})
    results = {name: [] for name in [*sides, "in_process"]}
    order = list(sides)
    for r in range(FLAGS.rounds):
      for name in (order if r % 2 == 0 else order[::-1]):
        for other, pids in trees.items():
          process_cpu.signal_all(
              pids, signal.SIGCONT if other == name else signal.SIGSTOP)
        http_load.measure(sides[name], bodies, FLAGS.clients, 10**9, 1.0, "wrk")
        c0 = process_cpu.cpu_seconds(trees[name])
        m = http_load.measure(sides[name], bodies, FLAGS.clients, 10**9, FLAGS.seconds,
                              "wrk")
        used = process_cpu.cpu_seconds(trees[name]) - c0
        line = {"round": r, "side": name, "lists_per_s": m["lists_per_s"],
                "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"], "errors": m["errors"],
                "cpu_ms_per_list": round(1000 * used / max(m["requests"], 1), 4)}
        results[name].append(line)
        print(json.dumps(line), flush=True)
      for pids in trees.values():
        process_cpu.signal_all(pids, signal.SIGSTOP)
      t0 = time.perf_counter()
      scorer.score(big)
      line = {"round": r, "side": "in_process",
              "lists_per_s": round(n / (time.perf_counter() - t0), 1)}
      results["in_process"].append(line)
      print(json.dumps(line), flush=True)
    for name, lines in results.items():
      summary = {"what": "median", "side": name,
                 "lists_per_s": statistics.median(l["lists_per_s"] for l in lines)}
      if name != "in_process":
        summary.update(
            p99_ms=statistics.median(l["p99_ms"] for l in lines),
            cpu_ms_per_list=statistics.median(l["cpu_ms_per_list"] for l in lines),
            of_in_process=round(statistics.median(
                l["lists_per_s"] / i["lists_per_s"]
                for l, i in zip(lines, results["in_process"])), 3))
      print(json.dumps(summary), flush=True)
  finally:
    process_cpu.end_sessions(procs.values())

if __name__ == "__main__":
  app.run(main)
