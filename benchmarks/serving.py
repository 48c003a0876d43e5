r"""Benchmark: the online service under load, beside the in-process scorer's ceiling.

  python -m benchmarks.serving [--checkpoint=RUN] [--levels=1,8,32,128]

Starts ``experiments.serve`` on a free localhost port (a process of its own), replays
the lists of the run's own-lists example (one list per request, the requests built
from the file with ``replay.request_bodies``; with ``--lists_per_request=k``, k lists
per request to ``/rerank_lists``) from ``c`` concurrent clients for each
level ``c`` (keep-alive connections, from aiohttp in this process or, with
``--load_generator=wrk``, from the C load generator wrk; at most
``--requests_per_level`` requests and ``--seconds_per_level`` seconds per level,
after ``--warmup`` requests),
and prints one JSON line per level: lists/s, p50 / p95 / p99 latency (ms, client
side), the mean batch size (the service's ``/metrics``), errors. Then, with the
service stopped, the in-process scorer (``serving.Scorer``, the batch reranker's) on
the same lists and model: its lists/s, the ceiling the service is compared with;
last, each level's lists/s as a fraction of that ceiling (the issue's target: at
least half, at 32 clients and one list per request).

With ``--engine=triton`` the service is ``experiments.serve_triton`` instead: the
same request and reply on Triton Inference Server, through the ``dnr`` backend (C++,
no Python per request), each body sent as Triton's ``request`` tensor
(``dnr_jax.serving.triton.client``); the mean batch size is then Triton's
(inferences over executions, from its metrics). One list per request only.

Without ``--checkpoint`` it first trains the reranker of
``experiments/configs/lists_example.flags`` (DNR-G, n = 20; about a minute on 2 CPU
cores) into ``--workdir``. The clients and the service share the machine's cores,
as a sidecar load test would (``http_load`` says what each generator costs).
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

from absl import app, flags
import numpy as np

from benchmarks import http_load
from benchmarks import run_requests

flags.DEFINE_string("checkpoint", None, "A trained own-lists run (default: train the "
                    "lists_example reranker into --workdir).")
flags.DEFINE_string("workdir", "/tmp/dnr_serving_bench", "Where the default run goes.")
flags.DEFINE_list("levels", ["1", "8", "32", "128"], "Concurrent clients per level.")
flags.DEFINE_integer("requests_per_level", 4000, "At most this many requests per level "
                     "(aiohttp; wrk runs for --seconds_per_level).")
flags.DEFINE_float("seconds_per_level", 15.0, "At most this long per level.")
flags.DEFINE_enum("load_generator", "aiohttp", http_load.GENERATORS, "The clients: "
                  "aiohttp in this process, or the C load generator wrk (installed "
                  "apart), whose clients take about a tenth of the CPU.")
flags.DEFINE_integer("warmup", 200, "Requests sent (at the level's concurrency) before "
                     "the measurement.")
flags.DEFINE_enum("engine", "litserve", ["litserve", "triton"], "The service: "
                  "experiments.serve (LitServe) or experiments.serve_triton (Triton, "
                  "the dnr backend).")
flags.DEFINE_integer("max_batch_size", 64, "The service's --max_batch_size.")
flags.DEFINE_float("batch_timeout_ms", None, "The service's --batch_timeout_ms "
                   "(Triton: its --queue_delay_us); default: the engine's own.")
flags.DEFINE_integer("http_processes", 1, "The service's --http_processes.")
flags.DEFINE_integer("workers", 1, "The service's --workers.")
flags.DEFINE_integer("instances", 1, "Triton: serve_triton's --instances.")
flags.DEFINE_integer("intra_op_threads", 1, "Triton: serve_triton's "
                     "--intra_op_threads.")
flags.DEFINE_integer("lists_per_request", 1, "Lists per request: 1 posts each to "
                     "/rerank; more post them in groups to /rerank_lists (lists/s "
                     "then counts every list of a request answered with 200).")
flags.register_validator("lists_per_request", lambda k: 1 <= k <= 1024,
                         "--lists_per_request must be in 1..1024")
flags.DEFINE_integer("scorer_lists", 8192, "Lists for the in-process scorer's timing.")
flags.DEFINE_integer("scorer_batch_size", 0, "The in-process scorer's batch (0: the "
                     "run's evaluation batch, as experiments.rerank).")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpoint() -> str:
  if FLAGS.checkpoint:
    return FLAGS.checkpoint
  run = os.path.join(FLAGS.workdir, "runs", "prm", "dnr_g", "seed0")
  if not os.path.isdir(os.path.join(run, "bundle")):
    print(f"training the lists_example reranker (DNR-G) into {FLAGS.workdir} ...",
          file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "experiments.lists",
                    "--flagfile=experiments/configs/lists_example.flags",
                    "--methods=dnr_g", f"--workdir={FLAGS.workdir}", "--plots=false"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  return run


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      return r.status, r.read().decode()
  except urllib.error.HTTPError as e:
    return e.code, ""
  except OSError:
    return 0, ""


def _batch_stats(metrics_url: str) -> tuple[float, float]:
  """(lists, batches) scored so far, from the service's metrics."""
  _, text = _get(metrics_url)
  def value(name):
    m = re.search(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(2)) if m else 0.0
  if FLAGS.engine == "triton":
    return value("nv_inference_count"), value("nv_inference_exec_count")
  return value("dnr_batch_size_sum"), value("dnr_batch_size_count")


def _service(checkpoint: str, port: int, k: int) -> tuple[list, str, str, str, dict]:
  """The service's command, its POST URL, readiness URL, metrics URL, and the
  headers of every request."""
  base = f"http://127.0.0.1:{port}"
  if FLAGS.engine == "triton":
    metrics_port = http_load.free_port()
    from dnr_jax.serving.triton import client  # pylint: disable=g-import-not-at-top
    return ([sys.executable, "-m", "experiments.serve_triton",
             f"--checkpoint={checkpoint}", f"--port={port}",
             f"--metrics_port={metrics_port}",
             f"--max_batch_size={FLAGS.max_batch_size}",
             f"--instances={FLAGS.instances}",
             f"--intra_op_threads={FLAGS.intra_op_threads}"] + (
                 [] if FLAGS.batch_timeout_ms is None else
                 [f"--queue_delay_us={round(FLAGS.batch_timeout_ms * 1000)}"]),
            base + "/v2/models/dnr_rerank/infer", base + "/v2/health/ready",
            f"http://127.0.0.1:{metrics_port}/metrics", dict(client.HEADERS))
  return ([sys.executable, "-m", "experiments.serve", f"--checkpoint={checkpoint}",
           f"--port={port}", f"--max_batch_size={FLAGS.max_batch_size}",
           f"--http_processes={FLAGS.http_processes}", f"--workers={FLAGS.workers}",
           f"--max_lists_per_request={max(k, 64)}"] + (
               [] if FLAGS.batch_timeout_ms is None else
               [f"--batch_timeout_ms={FLAGS.batch_timeout_ms}"]),
          base + run_requests.post_path(k), base + "/ready", base + "/metrics",
          {"Content-Type": "application/json"})


def _scorer_lists_per_s(bundle, arrays) -> dict:
  from dnr_jax.serving import Scorer  # pylint: disable=g-import-not-at-top
  n = len(arrays["items"])
  reps = -(-FLAGS.scorer_lists // n)
  big = {k: np.concatenate([v] * reps)[:FLAGS.scorer_lists] for k, v in arrays.items()}
  scorer = Scorer(bundle, batch_size=FLAGS.scorer_batch_size or None)
  scorer.score({k: v[:scorer.batch_size] for k, v in big.items()})   # compile
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    scorer.score(big)
    times.append(time.perf_counter() - t0)
  return {"what": "in-process scorer", "lists": FLAGS.scorer_lists,
          "batch_size": scorer.batch_size,
          "lists_per_s": round(FLAGS.scorer_lists / min(times), 1)}


def main(argv):
  del argv
  from dnr_jax import serving  # pylint: disable=g-import-not-at-top
  checkpoint = _checkpoint()
  bundle = serving.load_bundle(checkpoint)
  k = FLAGS.lists_per_request
  if FLAGS.engine == "triton" and k != 1:
    raise app.UsageError("--engine=triton takes one list per request "
                         "(--lists_per_request=1)")
  bodies, arrays = run_requests.request_bodies(bundle, k)
  cmd, url, ready, metrics, headers = _service(checkpoint, http_load.free_port(), k)
  if FLAGS.engine == "triton":
    from dnr_jax.serving.triton import client  # pylint: disable=g-import-not-at-top
    bodies = [client.request_body(b) for b in bodies]
  print(f"starting: {' '.join(cmd)}", file=sys.stderr, flush=True)
  server = subprocess.Popen(cmd, cwd=ROOT)
  try:
    t0 = time.time()
    while _get(ready)[0] != 200:
      if server.poll() is not None:
        raise SystemExit(f"the service exited with status {server.returncode}")
      if time.time() - t0 > 300:
        raise SystemExit("the service was not ready after 300 s")
      time.sleep(0.5)
    # null: the engine's own default delay.
    print(json.dumps({"what": "service ready", "engine": FLAGS.engine,
                      "seconds": round(time.time() - t0, 1),
                      "requests": len(bodies), "lists_per_request": k,
                      "batch_timeout_ms": FLAGS.batch_timeout_ms}), flush=True)
    served = {}
    for level in [int(x) for x in FLAGS.levels]:
      asyncio.run(http_load.drive(url, bodies, level, FLAGS.warmup, 60, headers))
      s0, c0 = _batch_stats(metrics)
      result = http_load.measure(url, bodies, level, FLAGS.requests_per_level,
                                 FLAGS.seconds_per_level, FLAGS.load_generator, headers)
      s1, c1 = _batch_stats(metrics)
      result["lists_per_s"] = round(result["lists_per_s"] * k, 1)
      served[level] = result["lists_per_s"]
      print(json.dumps({"engine": FLAGS.engine, "clients": level,
                        "lists_per_request": k, **result,
                        "mean_batch": round((s1 - s0) / max(c1 - c0, 1), 2),
                        "load": FLAGS.load_generator}), flush=True)
  finally:
    server.terminate()
    try:
      server.wait(60)
    except subprocess.TimeoutExpired:
      server.kill()
  ceiling = _scorer_lists_per_s(bundle, arrays)
  print(json.dumps(ceiling), flush=True)
  print(json.dumps({"what": "of the in-process rate", "lists_per_request": k,
                    "by_clients": {str(c): round(v / ceiling["lists_per_s"], 3)
                                   for c, v in served.items()}}), flush=True)


if __name__ == "__main__":
  app.run(main)
