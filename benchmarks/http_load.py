"""The load generators of the serving benchmarks: keep-alive HTTP clients.

Two, chosen by ``measure(..., generator=)``:

* ``aiohttp``: asyncio clients in the benchmark's own process (aiohttp, from the
  ``serve`` extra). On a small machine they take a share of the cores the server
  runs on (about 0.1 ms of CPU per request on the 2-core build machine), as a
  sidecar load test would.
* ``wrk``: the C load generator (``apt-get install wrk``), one thread; about a
  tenth of the CPU per request, so the numbers come closer to a server whose clients
  run elsewhere. It runs for the time given (no request count).

Localhost only: the benchmarks start the servers they drive.
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

import numpy as np

GENERATORS = ("aiohttp", "wrk")


def free_port() -> int:
  """A TCP port on localhost that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


async def drive(url: str, bodies: list, concurrency: int, count: int, seconds: float,
                headers: Optional[dict] = None):
  """``concurrency`` keep-alive aiohttp clients POST ``bodies`` (round robin) to
  ``url`` until ``count`` requests or ``seconds`` have gone by.

  Returns:
    ``(latencies in seconds, errors, wall seconds)``.
  """
  import aiohttp  # pylint: disable=g-import-not-at-top
  latencies, errors = [], 0
  sent = 0
  deadline = time.perf_counter() + seconds
  headers = headers or {"Content-Type": "application/json"}
  connector = aiohttp.TCPConnector(limit=concurrency)
  async with aiohttp.ClientSession(connector=connector) as session:

    async def client():
      nonlocal sent, errors
      while sent < count and time.perf_counter() < deadline:
        body = bodies[sent % len(bodies)]
        sent += 1
        t0 = time.perf_counter()
        try:
          async with session.post(url, data=body, headers=headers) as r:
            await r.read()
            if r.status != 200:
              errors += 1
        except aiohttp.ClientError:
          errors += 1
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
  return np.asarray(latencies), errors, wall


# wrk's script: the bodies round robin (each behind a line with its length in bytes,
# so a body may hold any bytes: binary tensors too), and at the end one JSON
# line of what is measured. Every error counts: connect, read, write, timeout and
# any status but 2xx/3xx (``requests`` holds the replies, those with a bad status
# among them).
_WRK_SCRIPT = """
local bodies = {}
local file = assert(io.open([==[%(bodies)s]==], "rb"))
for size in file:lines() do bodies[#bodies + 1] = file:read(tonumber(size)) end
file:close()
local i = 0
local headers = {%(headers)s}
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", nil, headers, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
      '\\n{"requests": %%d, "duration_us": %%d, "errors": %%d, "bad_status": %%d, ' ..
      '"p50_us": %%d, "p95_us": %%d, "p99_us": %%d}\\n', summary.requests,
      summary.duration, e.connect + e.read + e.write + e.status + e.timeout, e.status,
      latency:percentile(50),
      latency:percentile(95), latency:percentile(99)))
end
"""


def _wrk(url: str, bodies: list, concurrency: int, seconds: float,
         headers: Optional[dict] = None) -> dict:
  wrk = shutil.which("wrk")
  if wrk is None:
    raise SystemExit("--load_generator=wrk: wrk is not installed (apt-get install wrk)")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "bodies")
    with open(path, "wb") as f:
      for body in bodies:
        f.write(b"%d\n%s" % (len(body), body))
    script = os.path.join(tmp, "post.lua")
    with open(script, "w") as f:
      f.write(_WRK_SCRIPT % {"bodies": path, "headers": ", ".join(
          f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in
          (headers or {"Content-Type": "application/json"}).items())})
    proc = subprocess.run(
        [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
         "--timeout", "30s", "-s", script, url], capture_output=True, text=True)
  line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("{")),
              None)
  if proc.returncode or line is None:
    raise RuntimeError(f"wrk failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
  line = json.loads(line)
  answered = line["requests"] - line["bad_status"]
  return {"requests": line["requests"], "errors": line["errors"],
          "lists_per_s": round(answered / (line["duration_us"] / 1e6), 1),
          "p50_ms": round(line["p50_us"] / 1000, 2),
          "p95_ms": round(line["p95_us"] / 1000, 2),
          "p99_ms": round(line["p99_us"] / 1000, 2)}


def measure(url: str, bodies: list, concurrency: int, count: int, seconds: float,
            generator: str = "aiohttp", headers: Optional[dict] = None) -> dict:
  """``concurrency`` clients POST ``bodies`` to ``url`` (round robin, keep-alive)
  for at most ``count`` requests (aiohttp only) and ``seconds``, with ``headers``
  (default: the JSON content type) on every request.

  Returns:
    ``{"requests", "errors", "lists_per_s", "p50_ms", "p95_ms", "p99_ms"}``:
    ``lists_per_s`` counts the lists answered with 200; latencies as the clients
    see them.
  """
  if generator == "wrk":
    return _wrk(url, bodies, concurrency, seconds, headers)
  if generator != "aiohttp":
    raise ValueError(f"generator={generator!r}: one of {GENERATORS}")
  lat, errors, wall = asyncio.run(drive(url, bodies, concurrency, count, seconds,
                                        headers))
  ms = lat * 1000
  return {"requests": len(lat), "errors": errors,
          "lists_per_s": round((len(lat) - errors) / wall, 1),
          "p50_ms": round(float(np.percentile(ms, 50)), 2),
          "p95_ms": round(float(np.percentile(ms, 95)), 2),
          "p99_ms": round(float(np.percentile(ms, 99)), 2)}
