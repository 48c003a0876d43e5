r"""The service and the reranker behind Triton Inference Server, alternated under one
load, with the in-process ceiling.

  python docs/results/serving_triton_prototype/run.py \
      --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 [--rounds=6] [--seconds=5] \
      [--variants=t1_b64:1:64:1000,...]

Run from the repository root. Triton comes from the nvidia-pytriton 0.6.0 wheel
(its ``tritonserver`` binary, Python backend and Python 3.11 stub; the Python
package itself is not used): ``--pytriton_dir`` is the unpacked wheel, downloaded
with ``pip download --no-deps`` and unpacked there when it is missing. Each variant
``NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US`` gets a model repository of its own (the
Python backend copied beside it with the 3.11 stub, ``model.py`` and its
``config.pbtxt``) and a ``tritonserver`` on free localhost ports. The driver checks
that each side answers the service's replies for 64 lists and refuses a bad request
alone, then alternates the load (``benchmarks.alternate``) with wrk clients. The
Triton servers are not stopped between their turns: idle they use no CPU (measured:
0.0 s per s), and ``tritonserver`` died with SIGSEGV after being stopped and resumed.
Requests to Triton carry the service's body as a UINT8 tensor in Triton's binary
tensor extension, behind a JSON header padded to a fixed length (so one
``Inference-Header-Content-Length`` serves every body).
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

from absl import app, flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from benchmarks import alternate
from benchmarks import http_load
from benchmarks import process_cpu
from benchmarks import run_requests

flags.DEFINE_string("checkpoint", "/tmp/lex/runs/prm/dnr_g/seed0", "The run served.")
flags.DEFINE_integer("rounds", 6, "Turns of each side.")
flags.DEFINE_float("seconds", 5.0, "Seconds per turn (after 1 s of warm-up).")
flags.DEFINE_integer("clients", 32, "Concurrent wrk clients.")
flags.DEFINE_list("variants", ["t1_b64:1:64:1000", "t2_b16:2:16:1000"],
                  "Triton arrangements, NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US.")
flags.DEFINE_string("pytriton_dir", "/tmp/pytriton-0.6.0",
                    "The unpacked nvidia-pytriton 0.6.0 wheel (fetched if missing).")
FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "dnr_rerank"
HEADER_BYTES = 256   # the JSON header, padded with spaces to this length
TRITON_HEADERS = {"Inference-Header-Content-Length": str(HEADER_BYTES),
                  "Content-Type": "application/octet-stream"}
BAD = b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}'

CONFIG = """name: "{model}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "request" data_type: TYPE_UINT8 dims: [ -1 ] allow_ragged_batch: true }} ]
output [ {{ name: "reply" data_type: TYPE_UINT8 dims: [ -1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "checkpoint" value: {{ string_value: "{checkpoint}" }} }}
parameters {{ key: "max_batch" value: {{ string_value: "{max_batch}" }} }}
"""


def _pytriton() -> str:
  if not os.path.exists(os.path.join(FLAGS.pytriton_dir, "pytriton")):
    with tempfile.TemporaryDirectory() as tmp:
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                      "nvidia-pytriton==0.6.0", "-d", tmp], check=True)
      with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as z:
        z.extractall(FLAGS.pytriton_dir)
    os.chmod(os.path.join(FLAGS.pytriton_dir, "pytriton/tritonserver/bin/tritonserver"),
             0o755)
    os.chmod(os.path.join(FLAGS.pytriton_dir, "pytriton/tritonserver/python_backend_stubs"
                          "/3.11/triton_python_backend_stub"), 0o755)
  return FLAGS.pytriton_dir


def _layout(work: str, pytriton: str, instances: int, max_batch: int, delay_us: int):
  """A backend directory (the Python backend with the 3.11 stub) and a model
  repository under ``work``."""
  server = os.path.join(pytriton, "pytriton", "tritonserver")
  backend = os.path.join(work, "backends", "python")
  shutil.copytree(os.path.join(server, "backends", "python"), backend)
  shutil.copy2(os.path.join(server, "python_backend_stubs", "3.11",
                            "triton_python_backend_stub"), backend)
  model = os.path.join(work, "repo", MODEL)
  os.makedirs(os.path.join(model, "1"))
  shutil.copy2(os.path.join(HERE, "model.py"), os.path.join(model, "1", "model.py"))
  with open(os.path.join(model, "config.pbtxt"), "w") as f:
    f.write(CONFIG.format(model=MODEL, max_batch=max_batch, delay_us=delay_us,
                          instances=instances,
                          checkpoint=os.path.abspath(FLAGS.checkpoint)))


def _start(work: str, pytriton: str, port: int) -> subprocess.Popen:
  env = dict(os.environ, LD_LIBRARY_PATH=":".join([
      sysconfig.get_config_var("LIBDIR"), os.path.join(pytriton, "nvidia_pytriton.libs")]))
  return subprocess.Popen(
      [os.path.join(pytriton, "pytriton", "tritonserver", "bin", "tritonserver"),
       f"--model-repository={work}/repo", f"--backend-directory={work}/backends",
       f"--http-port={port}", "--allow-grpc=false", "--allow-metrics=false",
       "--exit-timeout-secs=5", "--log-info=false", "--log-warning=false"],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=open(os.path.join(work, "log"), "wb"), start_new_session=True)


def triton_body(body: bytes) -> bytes:
  """The service's body as Triton's binary-extension request."""
  header = json.dumps({
      "inputs": [{"name": "request", "shape": [1, len(body)], "datatype": "UINT8",
                  "parameters": {"binary_data_size": len(body)}}],
      "outputs": [{"name": "reply", "parameters": {"binary_data": True}}]}).encode()
  if len(header) > HEADER_BYTES:
    raise ValueError(f"header of {len(header)} bytes")
  return header.ljust(HEADER_BYTES) + body


def post(url: str, body: bytes, headers: dict) -> tuple[int, bytes]:
  """Status and body; for Triton, the reply's binary part or the error's JSON."""
  req = urllib.request.Request(url, data=body, headers=headers)
  try:
    with urllib.request.urlopen(req, timeout=10) as r:
      data, n = r.read(), r.headers.get("Inference-Header-Content-Length")
      return r.status, data[int(n):] if n else data
  except urllib.error.HTTPError as e:
    return e.code, e.read()
  except OSError:
    return 0, b""


def main(argv):
  del argv
  from dnr_jax import serving
  bundle = serving.load_bundle(FLAGS.checkpoint)
  bodies, arrays = run_requests.request_bodies(bundle, 1)
  json_headers = {"Content-Type": "application/json"}
  pytriton = _pytriton()
  sides, procs = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    try:
      port = http_load.free_port()
      procs["service"] = subprocess.Popen(
          [sys.executable, "-m", "experiments.serve", f"--checkpoint={FLAGS.checkpoint}",
           f"--port={port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL, start_new_session=True)
      sides["service"] = alternate.Side(f"http://127.0.0.1:{port}/rerank", [], bodies,
                                        json_headers)
      for v in FLAGS.variants:
        name, instances, max_batch, delay_us = v.split(":")
        work = os.path.join(tmp, name)
        _layout(work, pytriton, int(instances), int(max_batch), int(delay_us))
        port = http_load.free_port()
        procs[name] = _start(work, pytriton, port)
        sides[name] = alternate.Side(
            f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", [],
            [triton_body(b) for b in bodies], TRITON_HEADERS, stop=False)
      wrap = {name: (triton_body if name != "service" else (lambda b: b))
              for name in sides}
      for name, side in sides.items():
        t0 = time.time()
        while post(side.url, wrap[name](bodies[0]), side.headers)[0] != 200:
          if procs[name].poll() is not None or time.time() - t0 > 300:
            raise SystemExit(f"{name} did not start (exit {procs[name].poll()})")
          time.sleep(0.5)
      want = [json.loads(post(sides["service"].url, b, json_headers)[1])
              for b in bodies[:64]]
      for name, side in sides.items():
        got = [json.loads(post(side.url, wrap[name](b), side.headers)[1])
               for b in bodies[:64]]
        same = all(g["item_ids"] == w["item_ids"] and g["scores"] == w["scores"]
                   for g, w in zip(got, want))
        bad = post(side.url, wrap[name](BAD), side.headers)
        print(json.dumps({
            "side": name, "same_replies_as_service": same,
            "bad_request": [bad[0], bad[1].decode()[:120]],
            "good_failed_beside_a_bad_one": alternate.failed_beside_a_bad_one(
                lambda b, s=side: post(s.url, b, s.headers)[0],
                [wrap[name](b) for b in bodies], wrap[name](BAD))}), flush=True)
      for name, side in sides.items():
        side.pids = process_cpu.tree(procs[name].pid)
      scorer = serving.Scorer(bundle)
      n = 8192
      reps = -(-n // len(arrays["items"]))
      big = {k: np.concatenate([v] * reps)[:n] for k, v in arrays.items()}
      scorer.score({k: v[:scorer.batch_size] for k, v in big.items()})

      def ceiling():
        t0 = time.perf_counter()
        scorer.score(big)
        return n / (time.perf_counter() - t0)

      results = alternate.alternate(sides, ceiling, rounds=FLAGS.rounds,
                                    seconds=FLAGS.seconds, clients=FLAGS.clients)
      for line in alternate.medians(results):
        print(json.dumps(line), flush=True)
    finally:
      process_cpu.end_sessions(procs.values())


if __name__ == "__main__":
  app.run(main)
