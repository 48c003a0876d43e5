r"""Benchmark: two checkouts' services, alternated under the same load (A/B).

  python -m benchmarks.serving_ab --before=/path/to/old/checkout \
      [--after=.] [--checkpoint=RUN] [--lists_per_request=1] [--rounds=6] \
      [--seconds=6] [--clients=32] [--load_generator=wrk] [--after_flags=...]

How each round of the service's tuning was measured (``docs/serving_tuning.md``). The
build machine's speed drifts by a factor of two within minutes, so two services
measured one after the other compare the machine as much as the code. Here both
run at once (``experiments.serve`` from each checkout, each on a free localhost
port), the one not measured stopped (SIGSTOP on its whole process tree), and the
load alternates between them every ``--seconds`` (A B B A A B ...): the drift falls
on both alike. Printed per turn, one JSON line: lists/s, p50 / p99 latency, and the
service's CPU per list (its process tree's user and system time over the turn,
from /proc, divided by the lists answered); then the medians of each side, and
of the after/before ratio over the rounds.

``--before`` and ``--after`` are checkout directories (``git worktree add DIR
COMMIT``): each service runs with its checkout first on ``PYTHONPATH``. With
``--before=. --after_flags=...`` the two are one checkout, with and without a
setting. Both serve
``--checkpoint`` (default: the ``lists_example`` run that ``benchmarks.serving``
trains). Localhost only; the clients share the machine's cores.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from absl import app, flags

from benchmarks import http_load
from benchmarks import process_cpu
from benchmarks import run_requests

flags.DEFINE_string("before", None, "The baseline's checkout directory.")
flags.DEFINE_string("after", ".", "The candidate's checkout directory.")
flags.DEFINE_string("checkpoint", "/tmp/dnr_serving_bench/runs/prm/dnr_g/seed0",
                    "The trained own-lists run both serve.")
flags.DEFINE_integer("lists_per_request", 1, "Lists per request (1: POST /rerank; "
                     "more: POST /rerank_lists).")
flags.DEFINE_integer("rounds", 6, "Turns of each service.")
flags.DEFINE_float("seconds", 6.0, "Seconds per turn (after 1 s of warm-up).")
flags.DEFINE_integer("clients", 32, "Concurrent clients.")
flags.DEFINE_enum("load_generator", "wrk", http_load.GENERATORS, "The clients.")
flags.DEFINE_list("serve_flags", [], "More flags for both services, e.g. "
                  "--serve_flags=--max_batch_size=32.")
flags.DEFINE_list("after_flags", [], "More flags for the candidate only: a setting "
                  "against the same code without it (--before=. "
                  "--after_flags=--worker_cores=1).")
flags.mark_flag_as_required("before")
flags.register_validator("lists_per_request", lambda k: 1 <= k <= 1024,
                         "--lists_per_request must be in 1..1024")
FLAGS = flags.FLAGS

SIDES = ("before", "after")


def _ready(port: int) -> bool:
  try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


def main(argv):
  del argv
  from dnr_jax import serving  # pylint: disable=g-import-not-at-top
  k = FLAGS.lists_per_request
  bodies, _ = run_requests.request_bodies(serving.load_bundle(FLAGS.checkpoint), k)
  path = run_requests.post_path(k)
  dirs = {"before": os.path.abspath(FLAGS.before), "after": os.path.abspath(FLAGS.after)}
  # A checkout from before /rerank_lists has no --max_lists_per_request: one list per
  # request leaves it out.
  lists_flag = [f"--max_lists_per_request={max(k, 64)}"] if k > 1 else []
  ports, procs, logs = {}, {}, {}
  try:
    for side in SIDES:
      ports[side] = http_load.free_port()
      logs[side] = tempfile.TemporaryFile()
      procs[side] = subprocess.Popen(
          [sys.executable, "-m", "experiments.serve", f"--checkpoint={FLAGS.checkpoint}",
           f"--port={ports[side]}", *lists_flag, *FLAGS.serve_flags,
           *(FLAGS.after_flags if side == "after" else [])],
          cwd=dirs[side], env=dict(os.environ, PYTHONPATH=dirs[side]),
          stdout=subprocess.DEVNULL, stderr=logs[side], start_new_session=True)
    for side in SIDES:
      t0 = time.time()
      while not _ready(ports[side]):
        if procs[side].poll() is not None or time.time() - t0 > 300:
          logs[side].seek(0)
          tail = logs[side].read().decode(errors="replace").strip()[-2000:]
          raise SystemExit(f"the {side} service ({dirs[side]}) did not start "
                           f"(exit {procs[side].poll()}):\n{tail}")
        time.sleep(0.5)
    trees = {side: process_cpu.tree(procs[side].pid) for side in SIDES}
    results = {side: [] for side in SIDES}
    for r in range(FLAGS.rounds):
      for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
        other = SIDES[1 - SIDES.index(side)]
        process_cpu.signal_all(trees[other], signal.SIGSTOP)
        process_cpu.signal_all(trees[side], signal.SIGCONT)
        url = f"http://127.0.0.1:{ports[side]}{path}"
        http_load.measure(url, bodies, FLAGS.clients, 10**9, 1.0, FLAGS.load_generator)
        c0 = process_cpu.cpu_seconds(trees[side])
        m = http_load.measure(url, bodies, FLAGS.clients, 10**9, FLAGS.seconds,
                              FLAGS.load_generator)
        used = process_cpu.cpu_seconds(trees[side]) - c0
        lists_per_s = m["lists_per_s"] * k
        line = {"round": r, "side": side, "lists_per_request": k,
                "lists_per_s": round(lists_per_s, 1), "p50_ms": m["p50_ms"],
                "p99_ms": m["p99_ms"], "errors": m["errors"],
                "cpu_ms_per_list": round(1000 * used / max(lists_per_s * FLAGS.seconds,
                                                           1), 4)}
        results[side].append(line)
        print(json.dumps(line), flush=True)
    summary = {"what": "medians", "lists_per_request": k}
    for side in SIDES:
      summary[side] = {key: statistics.median(l[key] for l in results[side])
                       for key in ("lists_per_s", "p99_ms", "cpu_ms_per_list")}
    ratios = [a["lists_per_s"] / max(b["lists_per_s"], 1e-9)
              for a, b in zip(results["after"], results["before"])]
    summary["after_over_before"] = round(statistics.median(ratios), 3)
    summary["after_ahead_in"] = f"{sum(x > 1 for x in ratios)} of {len(ratios)}"
    print(json.dumps(summary), flush=True)
  finally:
    process_cpu.end_sessions(procs.values())


if __name__ == "__main__":
  app.run(main)
