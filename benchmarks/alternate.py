"""Several HTTP services measured in turns under one load, with an in-process ceiling.

The build machine's speed drifts by a factor of two within minutes, so services
measured one after the other compare the machine as much as the services. Here all
run at once; in each round each side in turn gets the load while the others are
stopped (SIGSTOP on their process trees; a side may opt out), the order reversed every other round,
and then, everything stopped, a ceiling (the in-process scorer) is timed. Ratios
to the ceiling are taken round by round. Used by the serving prototypes' drivers
under ``docs/results/``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence

import numpy as np

from benchmarks import http_load
from benchmarks import process_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Side:
  """A running service: where to POST, its processes, what to send.

  ``stop=False`` leaves it running when it is not measured: for a server that uses
  no CPU when idle and does not survive being stopped (``tritonserver`` with the
  Python backend died with SIGSEGV after SIGSTOP and SIGCONT)."""
  url: str
  pids: list
  bodies: list
  headers: Optional[dict] = None
  stop: bool = True


def turn(side: Side, clients: int, seconds: float, generator: str = "wrk") -> dict:
  """One turn: 1 s of warm-up load, then ``seconds`` measured, with the side's CPU
  time per list answered (its process tree's, from /proc)."""
  http_load.measure(side.url, side.bodies, clients, 10**9, 1.0, generator, side.headers)
  c0 = process_cpu.cpu_seconds(side.pids)
  m = http_load.measure(side.url, side.bodies, clients, 10**9, seconds, generator,
                        side.headers)
  used = process_cpu.cpu_seconds(side.pids) - c0
  return {"lists_per_s": m["lists_per_s"], "p50_ms": m["p50_ms"],
          "p99_ms": m["p99_ms"], "errors": m["errors"],
          "cpu_ms_per_list": round(1000 * used / max(m["requests"], 1), 4)}


def alternate(sides: dict[str, Side], ceiling: Callable[[], float], *, rounds: int,
              seconds: float, clients: int, generator: str = "wrk") -> dict:
  """``rounds`` rounds of one turn per side, then ``ceiling()`` (lists/s) with every
  side stopped. Prints one JSON line per turn; returns the lines per side, the
  ceiling's under ``"in_process"``."""
  results = {name: [] for name in [*sides, "in_process"]}
  order = list(sides)
  for r in range(rounds):
    for name in (order if r % 2 == 0 else order[::-1]):
      for other, side in sides.items():
        if side.stop:
          process_cpu.signal_all(side.pids,
                                 signal.SIGCONT if other == name else signal.SIGSTOP)
      line = {"round": r, "side": name, **turn(sides[name], clients, seconds, generator)}
      results[name].append(line)
      print(json.dumps(line), flush=True)
    for side in sides.values():
      if side.stop:
        process_cpu.signal_all(side.pids, signal.SIGSTOP)
    line = {"round": r, "side": "in_process", "lists_per_s": round(ceiling(), 1)}
    results["in_process"].append(line)
    print(json.dumps(line), flush=True)
  for side in sides.values():
    if side.stop:
      process_cpu.signal_all(side.pids, signal.SIGCONT)
  return results


def medians(results: dict) -> list[dict]:
  """Per side: the medians of its turns, and of its rate over the round's ceiling."""
  out = []
  for name, lines in results.items():
    summary = {"what": "median", "side": name,
               "lists_per_s": statistics.median(l["lists_per_s"] for l in lines)}
    if name != "in_process":
      summary.update(
          p99_ms=statistics.median(l["p99_ms"] for l in lines),
          cpu_ms_per_list=statistics.median(l["cpu_ms_per_list"] for l in lines),
          of_in_process=round(statistics.median(
              l["lists_per_s"] / i["lists_per_s"]
              for l, i in zip(lines, results["in_process"])), 3))
    out.append(summary)
  return out


def failed_beside_a_bad_one(post: Callable[[bytes], int], bodies: list, bad: bytes,
                            tries: int = 20, good: int = 15) -> str:
  """Of ``good`` good requests sent at once with one bad one (``tries`` times), how
  many got anything but 200 from ``post`` (a body -> the HTTP status): on an engine
  that gives a whole batch one status, those batched with the bad one."""
  failed = 0
  with concurrent.futures.ThreadPoolExecutor(good + 1) as pool:
    for t in range(tries):
      sent = [pool.submit(post, b) for b in bodies[t * good:(t + 1) * good]]
      pool.submit(post, bad)
      failed += sum(f.result() != 200 for f in sent)
  return f"{failed} of {tries * good}"


def in_process_ceiling(scorer, arrays: dict, lists: int = 8192) -> Callable[[], float]:
  """The ceiling for ``alternate``: ``scorer`` (a ``serving.Scorer``) over ``arrays``
  tiled to ``lists`` lists, compiled here; each call times one pass (lists/s)."""
  reps = -(-lists // len(arrays["items"]))
  big = {k: np.concatenate([v] * reps)[:lists] for k, v in arrays.items()}
  scorer.score({k: v[:scorer.batch_size] for k, v in big.items()})

  def ceiling():
    t0 = time.perf_counter()
    scorer.score(big)
    return lists / (time.perf_counter() - t0)

  return ceiling


def contract(post: Callable[[bytes], tuple], bodies: list, want: list,
             bad: bytes) -> dict:
  """What a side answers, against the service's replies ``want`` to ``bodies[:64]``:
  the same item order and scores, a lone ``bad`` body's status and reply, and
  ``failed_beside_a_bad_one``. ``post``: a body -> ``(status, reply bytes)``."""
  got = [json.loads(post(b)[1]) for b in bodies[:len(want)]]
  status, reply = post(bad)
  return {"same_replies_as_service": all(
              g["item_ids"] == w["item_ids"] and g["scores"] == w["scores"]
              for g, w in zip(got, want)),
          "bad_request": [status, reply.decode()[:120]],
          "good_failed_beside_a_bad_one": failed_beside_a_bad_one(
              lambda b: post(b)[0], bodies, bad)}



def start_service(checkpoint: str, flags: Sequence[str] = ()
                  ) -> tuple[subprocess.Popen, str]:
  """``experiments.serve`` of ``checkpoint`` on a free localhost port, with
  ``flags``, in a session of its own (``process_cpu.end_sessions`` ends it): its
  process and its ``/rerank`` URL."""
  port = http_load.free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.serve", f"--checkpoint={checkpoint}",
       f"--port={port}", *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, start_new_session=True)
  return proc, f"http://127.0.0.1:{port}/rerank"


def post_json(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
  """POSTs a JSON ``body``: the status and the reply's bytes (0 and nothing if the
  server is not answering)."""
  req = urllib.request.Request(url, data=body,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()
  except OSError:
    return 0, b""


def wait_for_200(post: Callable[[bytes], tuple], body: bytes, proc, name: str,
                 timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
  """Posts ``body`` (``post``: a body -> ``(status, reply)``) until it gets 200.

  Raises:
    SystemExit: naming ``name``, if ``proc`` (a ``Popen``) exits first or none came
      within ``timeout_s``.
  """
  t0 = time.time()
  while post(body)[0] != 200:
    if proc.poll() is not None or time.time() - t0 > timeout_s:
      raise SystemExit(f"{name} did not start (exit {proc.poll()})")
    time.sleep(poll_s)


def against_service(urls: dict, pids: dict, post: Callable[[str, bytes], tuple],
                    bodies: list, bad: bytes, scorer, arrays: dict, *, rounds: int,
                    seconds: float, clients: int) -> None:
  """Prints each side's ``contract`` against the side ``"service"``'s replies, then
  alternates the load between the sides (``urls`` and their process trees
  ``pids``, by name) and prints the medians, with ``scorer``'s ceiling."""
  want = [json.loads(post(urls["service"], b)[1]) for b in bodies[:64]]
  for name, url in urls.items():
    print(json.dumps({"side": name, **contract(
        lambda b, u=url: post(u, b), bodies, want, bad)}), flush=True)
  alternate_and_print({name: Side(url, pids[name], bodies) for name, url in
                       urls.items()}, scorer, arrays, rounds=rounds, seconds=seconds,
                      clients=clients)


def alternate_and_print(sides: dict[str, Side], scorer, arrays: dict, *, rounds: int,
                        seconds: float, clients: int) -> None:
  """``alternate`` with ``scorer``'s ``in_process_ceiling`` over ``arrays``, then
  ``medians``, each line printed as JSON."""
  results = alternate(sides, in_process_ceiling(scorer, arrays), rounds=rounds,
                      seconds=seconds, clients=clients)
  for line in medians(results):
    print(json.dumps(line), flush=True)
