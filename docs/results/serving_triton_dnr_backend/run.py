r"""The service's request path in a Triton C++ backend, alternated under one load with
the service, with the in-process ceiling.

  python -m experiments.rerank --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 \
      --export=/tmp/lex_export --export_format=onnx
  python docs/results/serving_triton_dnr_backend/run.py \
      --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 --export=/tmp/lex_export \
      [--rounds=6] [--seconds=5] [--variants=default:1:64:400:1,...]

Run from the repository root. This is ``experiments.serve_triton``'s arrangement
(``dnr_jax/serving/triton/``): Triton 2.51 from the nvidia-pytriton 0.6.0 wheel,
the ``dnr`` backend (``backend.cc``: the service's JSON, checks, vocabulary and
reply in C++, the model by ONNX Runtime) compiled by ``build``. Each variant
``NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US:THREADS[:BACKEND[:EXPORT]]`` serves the
export with INSTANCES CPU instances, each with an ONNX Runtime session of THREADS
intra-op threads; BACKEND, a folder that ``build.built`` wrote (another version of
the backend), in place of this checkout's (empty: this checkout's); EXPORT, another
export's folder (its ``reranker.onnx``, e.g. one written by an earlier version of
the exporter), in place of ``--export``. A request is the service's ``/rerank`` body, in Triton's binary tensor
extension (``triton_server.request_body``); the reply is the service's JSON reply.

Before the load the driver checks each side against the service: the same item
order and scores within 1e-5 for 64 lists, the service's 400 and line for a NaN
score, and how many of 300 good requests sent beside a bad one failed.
"""

import json
import os
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from benchmarks import alternate
from benchmarks import http_load
from benchmarks import process_cpu
from benchmarks import run_requests
from benchmarks import triton_server
from dnr_jax.serving.triton import build
from dnr_jax.serving.triton import repository

flags.DEFINE_string("checkpoint", "/tmp/lex/runs/prm/dnr_g/seed0", "The run served.")
flags.DEFINE_string("export", "/tmp/lex_export",
                    "The run's export with --export_format=onnx.")
flags.DEFINE_integer("rounds", 6, "Turns of each side.")
flags.DEFINE_float("seconds", 5.0, "Seconds per turn (after 1 s of warm-up).")
flags.DEFINE_integer("clients", 32, "Concurrent wrk clients.")
flags.DEFINE_list("variants", ["default:1:64:400:1"],
                  "Triton arrangements, "
                  "NAME:INSTANCES:MAX_BATCH:QUEUE_DELAY_US:THREADS[:BACKEND[:EXPORT]].")
flags.DEFINE_list("service_flags", [],
                  "Flags for the service (experiments.serve), e.g. --worker_cores=1.")
flags.DEFINE_string("pytriton_dir", triton_server.DEFAULT_DIR,
                    "The unpacked nvidia-pytriton 0.6.0 wheel (fetched if missing).")
FLAGS = flags.FLAGS
MODEL = repository.MODEL
BAD = b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}'


def _same(got: dict, want: dict) -> bool:
  return got["item_ids"] == want["item_ids"] and all(
      (g is None and w is None) or abs(g - w) <= 1e-5
      for g, w in zip(got["scores"], want["scores"], strict=True))


def main(argv):
  del argv
  from dnr_jax import serving
  from dnr_jax.serving.online import requests as requests_lib
  bundle = serving.load_bundle(FLAGS.checkpoint)
  limits = requests_lib.RequestLimits.from_bundle(bundle)
  bodies, arrays = run_requests.request_bodies(bundle, 1)
  wheel = triton_server.unpacked_wheel(FLAGS.pytriton_dir)
  backend = build.built()
  sides, procs, posts = {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    try:
      procs["service"], url = alternate.start_service(FLAGS.checkpoint,
                                                      FLAGS.service_flags)
      sides["service"] = alternate.Side(url, [], bodies,
                                        {"Content-Type": "application/json"})
      posts["service"] = lambda b, u=url: alternate.post_json(u, b)
      for v in FLAGS.variants:
        name, instances, max_batch, delay_us, threads, *other = v.split(":")
        other += ["", ""]
        work = os.path.join(tmp, name)
        repository.write(
            work, other[0] or backend,
            onnx_file=os.path.join(other[1] or FLAGS.export, "reranker.onnx"),
            vocab_file=os.path.join(FLAGS.export, "vocabulary", "vocab.json"),
            limits=limits, max_batch_size=int(max_batch), queue_delay_us=int(delay_us),
            instances=int(instances), intra_op_threads=int(threads))
        port = http_load.free_port()
        procs[name] = triton_server.start(work, wheel, port, tmp)
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        sides[name] = alternate.Side(
            url, [], [triton_server.request_body(b) for b in bodies],
            triton_server.HEADERS, stop=False)
        posts[name] = lambda b, u=url: triton_server.post(u, b)
      for name in sides:
        alternate.wait_for_200(posts[name], bodies[0], procs[name], name)
      want = [json.loads(posts["service"](b)[1]) for b in bodies[:64]]
      for name in sides:
        got = [json.loads(posts[name](b)[1]) for b in bodies[:64]]
        status, reply = posts[name](BAD)
        print(json.dumps({
            "side": name, "same_replies_as_service": sum(map(_same, got, want)),
            "bad_request": [status, reply.decode()[:120]],
            "good_failed_beside_a_bad_one": alternate.failed_beside_a_bad_one(
                lambda b, n=name: posts[n](b)[0], bodies, BAD)}), flush=True)
      for name, side in sides.items():
        side.pids = process_cpu.tree(procs[name].pid)
      alternate.alternate_and_print(sides, serving.Scorer(bundle), arrays,
                                    rounds=FLAGS.rounds, seconds=FLAGS.seconds,
                                    clients=FLAGS.clients)
    finally:
      process_cpu.end_sessions(procs.values())


if __name__ == "__main__":
  app.run(main)
