r"""The service and the reranker behind Triton Inference Server, alternated under one
load, with the in-process ceiling.

  python docs/results/serving_triton_prototype/run.py \
      --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 [--rounds=6] [--seconds=5] \
      [--variants=t1_b64:1:64:1000,...]

Run from the repository root. Triton comes from the nvidia-pytriton 0.6.0 wheel
(``benchmarks.triton_server``): ``--pytriton_dir`` is the unpacked wheel,
downloaded and unpacked there when it is missing. Each variant
``NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US`` gets a model repository of its own
(``model.py`` and its ``config.pbtxt``) and a ``tritonserver`` on a free localhost
port. The driver checks
that each side answers the service's replies for 64 lists and refuses a bad request
alone, then alternates the load (``benchmarks.alternate``) with wrk clients. The
Triton servers are not stopped between their turns: idle they use no CPU (measured:
0.0 s per s), and ``tritonserver`` died with SIGSEGV after being stopped and resumed.
Requests to Triton carry the service's body as a UINT8 tensor in Triton's binary
tensor extension (``triton_server.request_body``).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

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
flags.DEFINE_list("variants", ["t1_b64:1:64:1000", "t2_b16:2:16:1000"],
                  "Triton arrangements, NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US.")
flags.DEFINE_string("pytriton_dir", triton_server.DEFAULT_DIR,
                    "The unpacked nvidia-pytriton 0.6.0 wheel (fetched if missing).")
FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "dnr_rerank"
BAD = b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}'

def main(argv):
  del argv
  from dnr_jax import serving
  bundle = serving.load_bundle(FLAGS.checkpoint)
  bodies, arrays = run_requests.request_bodies(bundle, 1)
  wheel = triton_server.unpacked_wheel(FLAGS.pytriton_dir)
  sides, procs, posts = {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    try:
      port = http_load.free_port()
      procs["service"] = subprocess.Popen(
          [sys.executable, "-m", "experiments.serve", f"--checkpoint={FLAGS.checkpoint}",
           f"--port={port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL, start_new_session=True)
      url = f"http://127.0.0.1:{port}/rerank"
      sides["service"] = alternate.Side(url, [], bodies,
                                        {"Content-Type": "application/json"})
      posts["service"] = lambda b, u=url: alternate.post_json(u, b)
      for v in FLAGS.variants:
        name, instances, max_batch, delay_us = v.split(":")
        work = os.path.join(tmp, name)
        config = triton_server.bytes_model_config(
            MODEL, max_batch_size=int(max_batch), queue_delay_us=int(delay_us),
            instances=int(instances), parameters={
                "checkpoint": os.path.abspath(FLAGS.checkpoint),
                "max_batch": max_batch})
        triton_server.layout(work, wheel, {MODEL: (
            config, {"model.py": os.path.join(HERE, "model.py")})})
        port = http_load.free_port()
        procs[name] = triton_server.start(work, wheel, port, ROOT)
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        sides[name] = alternate.Side(
            url, [], [triton_server.request_body(b) for b in bodies],
            triton_server.HEADERS, stop=False)
        posts[name] = lambda b, u=url: triton_server.post(u, b)
      for name in sides:
        t0 = time.time()
        while posts[name](bodies[0])[0] != 200:
          if procs[name].poll() is not None or time.time() - t0 > 300:
            raise SystemExit(f"{name} did not start (exit {procs[name].poll()})")
          time.sleep(0.5)
      want = [json.loads(posts["service"](b)[1]) for b in bodies[:64]]
      for name in sides:
        print(json.dumps({"side": name, **alternate.contract(
            posts[name], bodies, want, BAD)}), flush=True)
      for name, side in sides.items():
        side.pids = process_cpu.tree(procs[name].pid)
      alternate.alternate_and_print(sides, serving.Scorer(bundle), arrays, rounds=FLAGS.rounds,
                                    seconds=FLAGS.seconds, clients=FLAGS.clients)
    finally:
      process_cpu.end_sessions(procs.values())


if __name__ == "__main__":
  app.run(main)
