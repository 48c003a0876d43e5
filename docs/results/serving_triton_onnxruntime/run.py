r"""The exported reranker in Triton's ONNX Runtime backend, alternated under one load
with the service, with the in-process ceiling.

  python -m experiments.rerank --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 \
      --export=/tmp/lex_export --export_format=triton
  python docs/results/serving_triton_onnxruntime/run.py \
      --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 --export=/tmp/lex_export \
      [--rounds=6] [--seconds=5] [--variants=o1_b64:1:64:100:1,...]

Run from the repository root. Triton 2.51 comes from the nvidia-pytriton 0.6.0
wheel (``benchmarks.triton_server``), its ONNX Runtime backend built from source
(``benchmarks.triton_onnxruntime_backend``). Each variant
``NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US:THREADS`` serves the exported repository
with its ``config.pbtxt`` changed in ``max_batch_size`` and the queue delay, and
given an ``instance_group`` of INSTANCES CPU instances whose ONNX Runtime sessions
run on THREADS intra-op threads each (``0``: ONNX Runtime's default, one per core);
``NAME:exported`` serves the ``config.pbtxt`` as exported.

This is not the request the service takes: a Triton request holds one list's
arrays, its ids already mapped through the vocabulary and padded as
``signature.json`` says (``triton_server.tensor_bodies``, Triton's binary tensor
extension), and the reply is the logits, not the reranked ids. Before the load the
driver checks that each variant's logits for 64 lists are the in-process scores
(max abs difference) and rerank them as the service does, and prints what a
request the service refuses (a NaN score; a float item id) gets from Triton, and
what each side uses of a core while idle.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from benchmarks import alternate
from benchmarks import http_load
from benchmarks import process_cpu
from benchmarks import run_requests
from benchmarks import triton_onnxruntime_backend
from benchmarks import triton_server

flags.DEFINE_string("checkpoint", "/tmp/lex/runs/prm/dnr_g/seed0", "The run served.")
flags.DEFINE_string("export", "/tmp/lex_export",
                    "The run's export with --export_format=triton.")
flags.DEFINE_integer("rounds", 6, "Turns of each side.")
flags.DEFINE_float("seconds", 5.0, "Seconds per turn (after 1 s of warm-up).")
flags.DEFINE_integer("clients", 32, "Concurrent wrk clients.")
flags.DEFINE_list("variants", ["o1_b64:1:64:100:1", "o2_b32:2:32:100:1"],
                  "Triton arrangements, NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US:THREADS.")
flags.DEFINE_bool("service", True, "Alternate with the service (experiments.serve).")
flags.DEFINE_string("pytriton_dir", triton_server.DEFAULT_DIR,
                    "The unpacked nvidia-pytriton 0.6.0 wheel (fetched if missing).")
flags.DEFINE_string("backend_dir", triton_onnxruntime_backend.DEFAULT_DIR,
                    "The ONNX Runtime backend's cache (built there if missing).")
FLAGS = flags.FLAGS
MODEL = "dnr_reranker"


def _config(text: str, instances: int, max_batch: int, delay_us: int,
            threads: int) -> str:
  for old, new in (("max_batch_size: ", f"max_batch_size: {max_batch}\n"),
                   ("max_queue_delay_microseconds: ",
                    f"max_queue_delay_microseconds: {delay_us}\n")):
    start = text.index(old)
    text = text[:start] + new + text[text.index("\n", start) + 1:]
  return text + (
      f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
      f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: '
      f'"{threads}" }} }}\n')


def main(argv):
  del argv
  from dnr_jax import serving
  from dnr_jax.serving import scorer as scorer_lib
  bundle = serving.load_bundle(FLAGS.checkpoint)
  bodies, arrays = run_requests.request_bodies(bundle, 1)
  with open(os.path.join(FLAGS.export, "signature.json")) as f:
    signature = json.load(f)
  names = signature["triton"]["inputs"]
  tensors, headers = triton_server.tensor_bodies(arrays, names, "logits")
  scorer = serving.Scorer(bundle)
  want = scorer.score({k: v[:64] for k, v in arrays.items()})[0]
  wheel = triton_server.unpacked_wheel(FLAGS.pytriton_dir)
  backend = triton_onnxruntime_backend.built(FLAGS.backend_dir)
  with open(os.path.join(FLAGS.export, signature["triton"]["config"])) as f:
    exported_config = f.read()
  model_file = os.path.join(FLAGS.export, signature["triton"]["model_file"])
  sides, procs = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    try:
      if FLAGS.service:
        port = http_load.free_port()
        procs["service"] = subprocess.Popen(
            [sys.executable, "-m", "experiments.serve",
             f"--checkpoint={FLAGS.checkpoint}", f"--port={port}"], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        sides["service"] = alternate.Side(f"http://127.0.0.1:{port}/rerank", [], bodies,
                                          {"Content-Type": "application/json"})
      ready = {}
      if FLAGS.service:
        ready["service"] = sides["service"].url.replace("/rerank", "/ready")
      for v in FLAGS.variants:
        name, *arrangement = v.split(":")
        config = (exported_config if arrangement == ["exported"] else
                  _config(exported_config, *map(int, arrangement)))
        work = os.path.join(tmp, name)
        triton_server.layout(work, wheel, {MODEL: (
            config, {"model.onnx": model_file})}, python_backend=False)
        triton_onnxruntime_backend.install(work, wheel, backend)
        port = http_load.free_port()
        procs[name] = triton_server.start(work, wheel, port, tmp)
        sides[name] = alternate.Side(
            f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", [], tensors, headers,
            stop=False)
        ready[name] = f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready"
      for name, url in ready.items():
        t0 = time.time()
        while True:
          try:
            urllib.request.urlopen(url, timeout=5)
            break
          except OSError:
            if procs[name].poll() is not None or time.time() - t0 > 300:
              log = os.path.join(tmp, name, "log")
              tail = open(log).read()[-2000:] if os.path.exists(log) else ""
              raise SystemExit(f"{name} is not ready (exit {procs[name].poll()})\n{tail}")
            time.sleep(0.5)
      service = [json.loads(urllib.request.urlopen(urllib.request.Request(
          sides["service"].url, data=b, headers=sides["service"].headers),
          timeout=10).read())["item_ids"] for b in bodies[:64]] if FLAGS.service else None
      for name, side in sides.items():
        if name == "service":
          continue
        got = []
        for i in range(64):
          status, reply = triton_server.post_request(side.url, side.bodies[i],
                                                     side.headers)
          if status != 200:
            raise SystemExit(f"{name}: list {i} got {status}: {reply[:500]!r}")
          got.append(np.frombuffer(reply, np.float32))
        got = np.stack(got)
        mask = arrays["mask"][:64]
        line = {"side": name, "max_abs_diff_vs_in_process": float(
            np.abs(np.where(mask, got - want, 0)).max())}
        if service is not None:
          ids = [json.loads(b)["item_ids"] for b in bodies[:64]]
          order = scorer_lib.rerank_order(got, mask)
          line["same_order_as_service"] = sum(
              [ids[i][j] for j in order[i][:int(mask[i].sum())]] == service[i]
              for i in range(64))
        bad = {}
        nan = {k: v[:1].copy() for k, v in arrays.items()}
        nan["scores"][0, 0] = np.nan
        (body,), h = triton_server.tensor_bodies(nan, names, "logits")
        status, reply = triton_server.post_request(side.url, body, h)
        bad["nan_score"] = [status, bool(np.isnan(np.frombuffer(reply, np.float32)).any())
                            if status == 200 else reply.decode()[:200]]
        floats = {**{k: v[:1] for k, v in arrays.items()},
                  "items": arrays["items"][:1].astype(np.float32)}
        (body,), h = triton_server.tensor_bodies(floats, names, "logits")
        status, reply = triton_server.post_request(side.url, body, h)
        bad["float_item_ids"] = [status, reply.decode(errors="replace")[:200]]
        line["bad_requests"] = bad
        print(json.dumps(line), flush=True)
      for name, side in sides.items():
        side.pids = process_cpu.tree(procs[name].pid)
      # The Triton sides are never stopped (SIGSTOP/SIGCONT crashed tritonserver):
      # what each uses idle, after the checks above, is measured here.
      time.sleep(1.0)
      before = {n: process_cpu.cpu_seconds(s.pids) for n, s in sides.items()}
      time.sleep(5.0)
      print(json.dumps({"idle_cpu_s_per_s": {
          n: round((process_cpu.cpu_seconds(s.pids) - before[n]) / 5.0, 3)
          for n, s in sides.items()}}), flush=True)
      alternate.alternate_and_print(sides, scorer, arrays, rounds=FLAGS.rounds,
                                    seconds=FLAGS.seconds, clients=FLAGS.clients)
    finally:
      process_cpu.end_sessions(procs.values())


if __name__ == "__main__":
  app.run(main)
