r"""The service and mosec prototypes, alternated under one load, with the ceiling.

  python docs/results/serving_mosec_prototype/run.py \
      --checkpoint=/tmp/lex/runs/prm/dnr_g/seed0 [--rounds=6] [--seconds=5]

Run from the repository root, with mosec installed (``pip install mosec==0.9.8``).
Starts ``experiments.serve`` and each mosec arrangement in ``--variants`` (see
``mosec_app.py``) on free localhost ports, checks that each answers the same
replies for 64 lists, then in each round drives each in turn from ``--clients``
wrk clients for ``--seconds`` (the others stopped with SIGSTOP), and times the
in-process scorer (every service stopped): ``benchmarks.alternate``. Prints one
JSON line per turn, then the medians per side, each also as a fraction of the
in-process rate.
"""

import os
import subprocess
import sys
import urllib.error
import urllib.request

from absl import app, flags

# The repository root, for ``benchmarks`` and ``dnr_jax`` (run as a script).
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
flags.DEFINE_list("variants", ["two_stage:2:1:64", "one_stage:1:2:64",
                               "one_stage_b16:1:2:16"],
                  "mosec arrangements, NAME:STAGES:SCORE_WORKERS:MAX_BATCH"
                  "[:STATUS_WORKERS].")
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


def main(argv):
  del argv
  from dnr_jax import serving
  bundle = serving.load_bundle(FLAGS.checkpoint)
  bodies, arrays = run_requests.request_bodies(bundle, 1)
  urls, procs = {}, {}
  try:
    procs["service"], urls["service"] = alternate.start_service(FLAGS.checkpoint)
    for v in FLAGS.variants:
      name, stages, workers, max_batch, *status_workers = v.split(":")
      port = http_load.free_port()
      env = dict(os.environ, DNR_CHECKPOINT=FLAGS.checkpoint, DNR_STAGES=stages,
                 DNR_SCORE_WORKERS=workers, DNR_MAX_BATCH=max_batch, DNR_WAIT_MS="1",
                 DNR_STATUS_WORKERS=(status_workers or ["1"])[0],
                 PYTHONPATH=ROOT)
      procs[name] = subprocess.Popen(
          [sys.executable, os.path.join(HERE, "mosec_app.py"), "--port", str(port),
           "--address", "127.0.0.1", "--log-level", "error"], env=env,
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
      urls[name] = f"http://127.0.0.1:{port}/inference"
    for name, url in urls.items():
      alternate.wait_for_200(lambda b, u=url: _post(u, b), bodies[0], procs[name], name)
    alternate.against_service(
        urls, {n: process_cpu.tree(p.pid) for n, p in procs.items()}, _post, bodies,
        BAD, serving.Scorer(bundle), arrays, rounds=FLAGS.rounds,
        seconds=FLAGS.seconds, clients=FLAGS.clients)
  finally:
    process_cpu.end_sessions(procs.values())

if __name__ == "__main__":
  app.run(main)
