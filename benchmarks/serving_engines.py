r"""Benchmark: LitServe, Ray Serve, BentoML, mosec, Triton under one load, engine cost
only.

  python -m benchmarks.serving_engines \
      [--engines=litserve,ray,bentoml,mosec,triton,uvicorn] \
      [--python_ray=/path/to/venv/bin/python] [--python_bentoml=...] \
      [--python_mosec=...] [--pytriton_dir=DIR] [--load_generator=aiohttp|wrk]

How the service's engine was chosen (``docs/serving.md``). Each engine serves the
same trivial batched endpoint: a request holds one list of 20 candidates with scores
(the online request's shape), the "model" orders a whole batch by score with numpy,
so what is measured is the engine: HTTP, batching, its processes. Each engine runs
with dynamic batching (at most 64 lists, 2 ms wait) and one worker, in a process tree
of its own started from ``--python_<engine>`` (engines whose dependencies conflict
can live in their own virtualenvs: the app needs only the engine and numpy). Printed
per engine, one JSON line: cold start (launch to the first answered request),
lists/s and p50 / p95 / p99 latency from ``--clients`` concurrent clients (aiohttp,
or wrk with ``--load_generator=wrk``; ``--requests`` requests or ``--seconds``),
and the CPU the idle service burns (its process tree, over 5 s). Localhost only.

``triton`` is Triton Inference Server 2.51 with the model in its Python backend,
taken from the nvidia-pytriton 0.6.0 wheel (``benchmarks.triton_server``; fetched
into ``--pytriton_dir`` if missing, and run with this Python): a request carries the
same JSON body as a UINT8 tensor in Triton's binary extension, and the model reads
and writes it with the standard library, as the other engines' apps do.

``--engines=uvicorn`` adds the floor under them all: the same work per request done
inline by a bare ASGI app on uvicorn (LitServe's HTTP server), one process, no
batching: what HTTP alone costs in Python on the machine. ``granian_asgi`` and
``granian_rsgi`` serve that app from granian (``--python_granian``: a Python with
granian), whose HTTP server is Rust: the same ASGI app, and the app on granian's own
RSGI interface.
"""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from absl import app, flags
import numpy as np

from benchmarks import http_load
from benchmarks import process_cpu
from benchmarks import triton_server

flags.DEFINE_list("engines", ["litserve", "ray", "bentoml"], "Engines to measure "
                  "(litserve, ray, bentoml, mosec, triton; and uvicorn, granian_asgi, "
                  "granian_rsgi: no engine, the same work inline on a bare app).")
flags.DEFINE_string("python_litserve", sys.executable, "Python with litserve.")
flags.DEFINE_string("python_ray", sys.executable, "Python with ray[serve].")
flags.DEFINE_string("python_bentoml", sys.executable, "Python with bentoml.")
flags.DEFINE_string("python_mosec", sys.executable, "Python with mosec.")
flags.DEFINE_string("pytriton_dir", triton_server.DEFAULT_DIR, "For triton: the "
                    "unpacked nvidia-pytriton 0.6.0 wheel (downloaded if missing).")
flags.DEFINE_string("python_uvicorn", sys.executable, "Python with uvicorn.")
flags.DEFINE_string("python_granian", sys.executable, "Python with granian (for "
                    "granian_asgi and granian_rsgi).")
flags.DEFINE_enum("load_generator", "aiohttp", http_load.GENERATORS, "The clients "
                  "(benchmarks/http_load.py).")
flags.DEFINE_integer("clients", 32, "Concurrent clients.")
flags.DEFINE_integer("requests", 4000, "At most this many requests.")
flags.DEFINE_float("seconds", 15.0, "At most this long.")
FLAGS = flags.FLAGS

# The shared "model": each list's candidates by score, highest first.
_MODEL = '''
import numpy as np

def order(bodies):
  out = []
  for b in bodies:
    s = np.asarray(b["scores"], np.float32)
    idx = np.argsort(-s, kind="stable")
    out.append({"item_ids": [b["item_ids"][i] for i in idx],
                "scores": s[idx].tolist()})
  return out
'''

# The floor's app: one list per request, ordered inline, as plain ASGI.
_ASGI_APP = '''
import json

async def app(scope, receive, send):
  if scope["type"] != "http":
    return
  body, more = b"", True
  while more:
    message = await receive()
    body += message.get("body", b"")
    more = message.get("more_body", False)
  reply = json.dumps(order([json.loads(body)])[0]).encode()
  await send({"type": "http.response.start", "status": 200,
              "headers": [(b"content-type", b"application/json"),
                          (b"content-length", str(len(reply)).encode())]})
  await send({"type": "http.response.body", "body": reply})
'''

APPS = {
    "litserve": _MODEL + '''
import sys
import litserve as ls

class Order(ls.LitAPI):
  def setup(self, device):
    pass
  def decode_request(self, request):
    return request
  def batch(self, inputs):
    return list(inputs)
  def predict(self, x):
    return order(x)
  def unbatch(self, output):
    return output
  def encode_response(self, output):
    return output

if __name__ == "__main__":
  api = Order(max_batch_size=64, batch_timeout=0.002, api_path="/rerank")
  ls.LitServer(api, accelerator="cpu", devices=1).run(
      host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False,
      log_level="warning")
''',
    "ray": _MODEL + '''
import sys, time
import ray
from ray import serve

@serve.deployment(max_ongoing_requests=512)
class Order:
  @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
  async def score(self, bodies):
    return order(bodies)

  async def __call__(self, request):
    return await self.score(await request.json())

if __name__ == "__main__":
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
  serve.run(Order.bind(), route_prefix="/rerank")
  while True:
    time.sleep(3600)
''',
    # No engine: the same work per request, inline, in a bare ASGI app on uvicorn with
    # its C parser (what LitServe's HTTP process runs on): no batching, no worker
    # process. The HTTP floor under the engines here.
    "uvicorn": _MODEL + _ASGI_APP + '''
import sys
import uvicorn

if __name__ == "__main__":
  uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools",
              log_level="warning", access_log=False)
''',
    # The same ASGI app, on granian (one process, its Rust HTTP server).
    "granian_asgi": _MODEL + _ASGI_APP + '''
import sys
from granian import Granian

if __name__ == "__main__":
  Granian("granian_asgi_app:app", address="127.0.0.1", port=int(sys.argv[1]),
          interface="asgi", workers=1, log_enabled=False).serve()
''',
    # The same work on granian's own interface (RSGI), which skips ASGI's messages.
    "granian_rsgi": _MODEL + '''
import json, sys
from granian import Granian

async def app(scope, proto):
  body = await proto()
  reply = json.dumps(order([json.loads(body)])[0]).encode()
  proto.response_bytes(200, [("content-type", "application/json")], reply)

if __name__ == "__main__":
  Granian("granian_rsgi_app:app", address="127.0.0.1", port=int(sys.argv[1]),
          interface="rsgi", workers=1, log_enabled=False).serve()
''',
    # Rust HTTP server and batcher, the Python worker behind a Unix socket.
    "mosec": _MODEL + '''
from mosec import Server, Worker

class Order(Worker):   # JSON in and out by the standard library, as the others
  def forward(self, bodies):
    return order(bodies)

if __name__ == "__main__":
  server = Server()
  server.append_worker(Order, num=1, max_batch_size=64, max_wait_time=2,
                       route="/rerank")
  server.run()
''',
    # C++ HTTP server and batcher, the model in the Python backend's stub process;
    # tensors by DLPack (benchmarks/triton_tensors.py, copied beside it).
    "triton": _MODEL + '''
import json
import triton_python_backend_utils as pb_utils
import triton_tensors

class TritonPythonModel:   # JSON in and out by the standard library, as the others
  def initialize(self, args):
    triton_tensors.install()

  def execute(self, requests):
    bodies = [json.loads(triton_tensors.array(
        pb_utils.get_input_tensor_by_name(r, "request")).tobytes()) for r in requests]
    return [pb_utils.InferenceResponse(output_tensors=[triton_tensors.tensor(
        pb_utils, "reply", np.frombuffer(json.dumps(o).encode(), np.uint8)[None])])
            for o in order(bodies)]
''',
    "bentoml": _MODEL + '''
import bentoml

@bentoml.service(workers=1)
class Order:
  @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=10000, route="/rerank")
  def rerank(self, bodies: list[dict]) -> list[dict]:
    return order(bodies)
''',
}


def _body(rng, engine: str) -> bytes:
  items = [f"sku-{i}" for i in rng.choice(10_000, 20, replace=False)]
  body = {"user_id": "u", "item_ids": items,
          "scores": [round(float(x), 4) for x in rng.random(20)]}
  # BentoML's batchable API takes a batch per request: here a batch of one list.
  return json.dumps({"bodies": [body]} if engine == "bentoml" else body).encode()


# Triton's model: batches of at most 64, a 2 ms wait, one instance, as the others.
_TRITON_CONFIG = triton_server.bytes_model_config("order", max_batch_size=64,
                                                  queue_delay_us=2000)
_JSON = {"Content-Type": "application/json"}


def _post(url: str, body: bytes, timeout: float = 2.0, headers=None) -> int:
  req = urllib.request.Request(url, data=body, headers=headers or _JSON)
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      r.read()
      return r.status
  except OSError:
    return 0


def measure(engine: str, python: str, workdir: str) -> dict:
  path = os.path.join(workdir, f"{engine}_app.py")
  with open(path, "w") as f:
    f.write(APPS[engine])
  port = http_load.free_port()
  url, headers = f"http://127.0.0.1:{port}/rerank", _JSON
  rng = np.random.default_rng(0)
  bodies = [_body(rng, engine) for _ in range(512)]
  if engine == "triton":
    work = os.path.join(tempfile.mkdtemp(dir=workdir), "triton")
    triton_server.layout(work, triton_server.unpacked_wheel(FLAGS.pytriton_dir),
                         {"order": (_TRITON_CONFIG, {"model.py": path})})
    url, headers = f"http://127.0.0.1:{port}/v2/models/order/infer", triton_server.HEADERS
    bodies = [triton_server.request_body(b) for b in bodies]
    cmd = None
  elif engine == "bentoml":
    cmd = [python, "-m", "bentoml", "serve", f"{engine}_app:Order", "--port",
           str(port), "--host", "127.0.0.1"]
  elif engine == "mosec":
    cmd = [python, path, "--port", str(port), "--address", "127.0.0.1",
           "--log-level", "warning"]
  else:
    cmd = [python, path, str(port)]
  t0 = time.time()
  if cmd is None:
    proc = triton_server.start(work, FLAGS.pytriton_dir, port, workdir)
  else:
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    while _post(url, bodies[0], headers=headers) != 200:
      if proc.poll() is not None or time.time() - t0 > 180:
        return {"engine": engine, "error": f"not serving (exit {proc.poll()})"}
      time.sleep(0.2)
    cold = time.time() - t0
    asyncio.run(http_load.drive(url, bodies, FLAGS.clients, 200, 30,
                                headers))   # warm-up
    time.sleep(1)
    pids = process_cpu.tree(proc.pid)
    c0 = process_cpu.cpu_seconds(pids)
    time.sleep(5)
    idle = (process_cpu.cpu_seconds(pids) - c0) / 5
    result = http_load.measure(url, bodies, FLAGS.clients, FLAGS.requests,
                               FLAGS.seconds, FLAGS.load_generator, headers)
    return {"engine": engine, "cold_start_s": round(cold, 1),
            "clients": FLAGS.clients, **result, "load": FLAGS.load_generator,
            "idle_cpu_cores": round(idle, 3), "processes": len(pids)}
  finally:
    process_cpu.end_sessions([proc])


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as workdir:
    for engine in FLAGS.engines:
      # Triton's stub embeds this interpreter's libpython.
      python = (sys.executable if engine == "triton"
                else getattr(FLAGS, f"python_{engine.split('_')[0]}"))
      print(json.dumps(measure(engine, python, workdir)), flush=True)


if __name__ == "__main__":
  app.run(main)
