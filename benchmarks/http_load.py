"""The load generator of the serving benchmarks: keep-alive HTTP clients on asyncio.

Used by ``benchmarks.serving`` and ``benchmarks.serving_engines`` (aiohttp, from the
``serve`` extra). Localhost only: the benchmarks start the servers they drive.
"""

import asyncio
import socket
import time

import numpy as np


def free_port() -> int:
  """A TCP port on localhost that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


async def drive(url: str, bodies: list, concurrency: int, count: int, seconds: float):
  """``concurrency`` keep-alive clients POST ``bodies`` (round robin) to ``url`` until
  ``count`` requests or ``seconds`` have gone by.

  Returns:
    ``(latencies in seconds, errors, wall seconds)``.
  """
  import aiohttp  # pylint: disable=g-import-not-at-top
  latencies, errors = [], 0
  sent = 0
  deadline = time.perf_counter() + seconds
  headers = {"Content-Type": "application/json"}
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
