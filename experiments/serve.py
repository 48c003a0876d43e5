r"""Serve a trained reranker online: HTTP, one list per request (or several), dynamic
batching.

  python -m experiments.serve --checkpoint=/tmp/dnr_lists_example/runs/prm/dnr_g/seed0 \
      [--port=8000] [--host=127.0.0.1] [--max_batch_size=64] [--batch_timeout_ms=1] \
      [--http_processes=1] [--workers=1]

``--checkpoint`` is what ``experiments.rerank`` takes (a run directory of
``experiments.lists``, its bundle, or a one-run workdir). ``POST /rerank`` takes one
list in raw ids and returns it reranked (``dnr_jax/serving/online/requests.py`` gives
the format), ``POST /rerank_lists`` several (``{"lists": [...]}``); ``GET /ready``,
``/healthz``, ``/metrics`` (Prometheus), ``/info``.
SIGTERM or Ctrl-C drains (the requests in flight are answered) and exits 0. Needs the
serve extra: ``pip install -e ".[serve]"``.
"""

from absl import flags

from dnr_jax import errors
from experiments import cli

flags.DEFINE_string("checkpoint", None, "A run directory, bundle or one-run workdir.")
flags.DEFINE_string("host", "127.0.0.1", "Where to listen: 127.0.0.1 (this machine), "
                    "0.0.0.0 or :: (every interface).")
flags.DEFINE_integer("port", 8000, "The port.")
flags.DEFINE_integer("max_batch_size", 64, "The most lists per scoring batch (a power "
                     "of two).")
flags.DEFINE_float("batch_timeout_ms", 1.0, "How long a request may wait for others "
                   "to batch with, counted from its arrival (0: no wait).")
flags.DEFINE_integer("max_candidates", 0, "The most candidates per request (0: the "
                     "reranker's n; those past n come back after the reranked ones).")
flags.DEFINE_integer("max_lists_per_request", 64, "The most lists a POST "
                     "/rerank_lists request may hold (1..1024).")
flags.DEFINE_float("request_timeout_s", 30.0, "A request the worker has not answered "
                   "within this gets 504.")
flags.DEFINE_float("drain_timeout_s", 30.0, "On SIGTERM, at most this long to answer "
                   "the requests in flight.")
flags.DEFINE_integer("http_processes", 1, "HTTP server processes (more lift the request "
                     "rate where cores are free).")
flags.DEFINE_integer("workers", 1, "Inference worker processes, each with the "
                     "reranker on JAX's first device (more lift the scoring rate where "
                     "cores are free).")
flags.DEFINE_integer("worker_cores", 0, "Cores of its own each inference worker binds "
                     "itself to (JAX's CPU threads); 0: every core. On a CPU machine "
                     "with few cores, 1 serves more lists/s.", lower_bound=0)
flags.DEFINE_string("server_log_level", "warning", "The HTTP servers' log level.")
flags.mark_flag_as_required("checkpoint")
FLAGS = flags.FLAGS


def run(argv) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  try:
    from dnr_jax.serving.online import service  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.ConfigError(f"the online service needs the serve extra (pip install "
                             f"-e \".[serve]\"): {e}") from e
  cli.setup()
  service.serve(service.ServiceConfig(
      checkpoint=FLAGS.checkpoint, host=FLAGS.host, port=FLAGS.port,
      max_batch_size=FLAGS.max_batch_size, batch_timeout_ms=FLAGS.batch_timeout_ms,
      max_candidates=FLAGS.max_candidates,
      max_lists_per_request=FLAGS.max_lists_per_request,
      request_timeout_s=FLAGS.request_timeout_s,
      drain_timeout_s=FLAGS.drain_timeout_s, http_processes=FLAGS.http_processes,
      workers=FLAGS.workers, worker_cores=FLAGS.worker_cores,
      log_level=FLAGS.server_log_level))


if __name__ == "__main__":
  cli.run_main(run)
