r"""Serve a trained reranker on Triton Inference Server: the online service's request
and reply, with no Python on a request's path.

  python -m experiments.serve_triton --checkpoint=/tmp/dnr_lists_example/runs/prm/dnr_g/seed0 \
      [--port=8000] [--metrics_port=8002] [--host=127.0.0.1] [--max_batch_size=64] \
      [--queue_delay_us=400] [--instances=1] [--intra_op_threads=1]

``--checkpoint`` is what ``experiments.serve`` takes. The run's reranker is exported
to ONNX, the ``dnr`` backend (C++: the service's JSON, checks, vocabulary and
reply) is compiled once, and Triton 2.51 (from the nvidia-pytriton wheel) serves
``POST /v2/models/dnr_rerank/infer``: the service's ``/rerank`` body as the
``request`` tensor (``dnr_jax/serving/triton/client.py`` gives the format), the
service's reply as ``reply``. ``/v2/health/ready``; Prometheus metrics on
``--metrics_port``. SIGTERM or Ctrl-C drains and exits 0. Needs the serve extra,
a C++17 compiler and RapidJSON's headers (Debian: ``g++ rapidjson-dev``); the
first start fetches Triton's headers (git) and the wheel (pip).
"""

import sys

from absl import flags

from dnr_jax import errors
from dnr_jax.serving.triton import repository
from experiments import cli

flags.DEFINE_string("checkpoint", None, "A run directory, bundle or one-run workdir.")
flags.DEFINE_string("host", "127.0.0.1", "Where to listen: 127.0.0.1 (this machine), "
                    "0.0.0.0 or :: (every interface).")
flags.DEFINE_integer("port", 8000, "The HTTP port.")
flags.DEFINE_integer("metrics_port", 8002, "The Prometheus metrics port (0: none).")
flags.DEFINE_integer("max_batch_size", 64, "The most lists per batch.")
flags.DEFINE_integer("queue_delay_us", repository.DEFAULT_QUEUE_DELAY_US, "How long a request may wait in Triton's "
                     "queue for others to batch with.")
flags.DEFINE_integer("max_candidates", 0, "The most candidates per request (0: the "
                     "reranker's n; those past n come back after the reranked ones).")
flags.DEFINE_integer("instances", 1, "Model instances, each scoring batches on a "
                     "thread of its own.")
flags.DEFINE_integer("intra_op_threads", 1, "ONNX Runtime threads per instance (0: "
                     "one per core).")
flags.DEFINE_integer("drain_timeout_s", 30, "On SIGTERM, at most this long to answer "
                     "the requests in flight.")
flags.DEFINE_string("workdir", "", "Where the model repository is written (default: a "
                    "temporary folder, removed at exit).")
flags.DEFINE_string("triton_dir", None, "The unpacked nvidia-pytriton 0.6.0 wheel "
                    "(default: ~/.cache/dnr_jax/nvidia-pytriton-0.6.0; fetched if "
                    "missing).")
flags.DEFINE_string("triton_sources", "", "Triton's core repository and ONNX Runtime's "
                    "C API header, for the build (default: a cache, fetched if missing).")
flags.mark_flag_as_required("checkpoint")
FLAGS = flags.FLAGS


def run(argv) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  from dnr_jax.serving.triton import server  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.triton import service  # pylint: disable=g-import-not-at-top
  cli.setup()
  sys.exit(service.serve(service.TritonServiceConfig(
      checkpoint=FLAGS.checkpoint, host=FLAGS.host, port=FLAGS.port,
      metrics_port=FLAGS.metrics_port, max_batch_size=FLAGS.max_batch_size,
      queue_delay_us=FLAGS.queue_delay_us, max_candidates=FLAGS.max_candidates,
      instances=FLAGS.instances, intra_op_threads=FLAGS.intra_op_threads,
      drain_timeout_s=FLAGS.drain_timeout_s, workdir=FLAGS.workdir,
      triton_dir=FLAGS.triton_dir or server.DEFAULT_DIR,
      sources_dir=FLAGS.triton_sources)))


if __name__ == "__main__":
  cli.run_main(run)
