"""The service's Prometheus metrics, shared by its processes.

The service runs in several processes (LitServe: HTTP processes and inference
workers), so the metrics use ``prometheus_client``'s multiprocess mode:
each process writes its own values under ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``
adds them up. The directory must be set before ``prometheus_client`` is imported in
any of them (``use_directory``), and each process creates its metric objects after
it started (``get``), never inheriting a parent's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

from dnr_jax.errors import ConfigError

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets (seconds) around the service's targets (a p99 of 25 ms).
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
  """The metric objects of one process."""

  def __init__(self):
    import prometheus_client as pc  # pylint: disable=g-import-not-at-top
    # registry=None: in multiprocess mode the values live in the files, and /metrics
    # reads them with a registry of its own; registering in the default registry
    # would fail in a process that inherited one already holding them.
    kw = {"registry": None}
    self.requests = pc.Counter("dnr_requests", "Rerank requests answered, by path "
                               "and HTTP status code (499: the client left).",
                               ["path", "code"], **kw)
    self.errors = pc.Counter("dnr_request_errors", "Rerank requests answered with an "
                             "error, by path and code (4xx: a bad request; 5xx: the "
                             "service).", ["path", "code"], **kw)
    self.latency = pc.Histogram("dnr_request_latency_seconds", "Time from a rerank "
                                "request's arrival to its reply, in the HTTP process, "
                                "by path.", ["path"], buckets=LATENCY_BUCKETS, **kw)
    self.batch_size = pc.Histogram("dnr_batch_size", "Lists per scoring batch (the "
                                   "dynamic batcher's batches).", buckets=BATCH_BUCKETS,
                                   **kw)
    self.lists = pc.Counter("dnr_lists_scored", "Lists scored by the reranker, by "
                            "inference worker (0, 1, ...).", ["worker"], **kw)
    self.unknown_ids = pc.Counter("dnr_unknown_ids", "Ids not in the run's vocabulary "
                                  "(mapped to 0), by column.", ["column"], **kw)


_METRICS: dict[int, Metrics] = {}


def use_directory(directory: Optional[str] = None) -> str:
  """Sets ``PROMETHEUS_MULTIPROC_DIR`` (a new temporary folder unless given or already
  set) for this process and the ones it starts; returns it.

  The values of an earlier run in a given folder are removed (prometheus_client's
  multiprocess mode would add them to this run's). Fails if ``prometheus_client`` was
  imported before without the variable: its processes would then count in memory,
  and ``/metrics`` would silently miss them.
  """
  import sys  # pylint: disable=g-import-not-at-top
  if "prometheus_client" in sys.modules and ENV not in os.environ:
    raise ConfigError("prometheus_client was imported before the service set "
                      f"{ENV}: start the service before importing it, or set {ENV} "
                      "to an empty folder first")
  directory = directory or os.environ.get(ENV) or tempfile.mkdtemp(prefix="dnr_prom_")
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if name.endswith(".db"):
      os.remove(os.path.join(directory, name))
  os.environ[ENV] = directory
  return directory


def remove_directory(directory: str) -> None:
  shutil.rmtree(directory, ignore_errors=True)


def get() -> Metrics:
  """This process's metrics (created on first use in each process)."""
  pid = os.getpid()
  if pid not in _METRICS:
    _METRICS[pid] = Metrics()
  return _METRICS[pid]


def exposition() -> tuple[bytes, str]:
  """``(body, content type)`` of every process's metrics, added up."""
  import prometheus_client as pc  # pylint: disable=g-import-not-at-top
  from prometheus_client import multiprocess  # pylint: disable=g-import-not-at-top
  registry = pc.CollectorRegistry()
  multiprocess.MultiProcessCollector(registry)
  return pc.generate_latest(registry), pc.CONTENT_TYPE_LATEST
