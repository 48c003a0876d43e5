"""dnr-jax: the Denoising Neural Reranker (DNR) in JAX/Flax."""

import setuptools

# The reranker outside JAX (dnr_jax/serving/onnx_export.py, triton_repository.py):
# the ONNX export (jax2onnx, onnx; onnxscript's optimizer simplifies the traced
# graph, serving/onnx_graph.py), ONNX Runtime (the reference it is checked
# against) and Triton's model-configuration schema (tritonclient[grpc] ships it).
# Never a dependency of the library itself. Lower bounds: the versions tested. Their
# own pins move three shared packages down (0.17.1: orbax-checkpoint < 0.11.37;
# tritonclient: ml-dtypes <= 0.5.4 and, for grpc, protobuf < 7), all within the
# ranges above; the checkpoint, data, model and serving tests pass with
# orbax-checkpoint 0.11.36, ml-dtypes 0.5.4 and protobuf 6.33.
#
# The online service (dnr_jax/serving/online/, experiments.serve): LitServe, pinned
# to the release whose private queue and socket set-up online/server.py overrides
# (``PipeQueueServer``),
# prometheus-client for /metrics, httptools (uvicorn's C HTTP parser; without it
# uvicorn falls back to pure-Python h11) and orjson (the replies' JSON) for the
# request rate docs/serving.md measures, and aiohttp for benchmarks.serving's clients.
SERVE = ["jax2onnx>=0.17.1", "onnx>=1.23", "onnxscript>=0.7.2,<0.8", "onnxruntime>=1.32",
         "tritonclient[grpc]>=2.73", "litserve==0.2.19",
         "prometheus-client>=0.20", "httptools>=0.6", "orjson>=3.10", "aiohttp>=3.9"]

setuptools.setup(
    name="dnr-jax",
    version="0.1.0",
    description="Denoising Neural Reranker (DNR) for two-stage recommenders, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["dnr_jax", "dnr_jax.*", "experiments",
                                               "experiments.*"]),
    package_data={"experiments": ["configs/*.flags"],
                  # The raw-ids Triton backend, compiled on first use.
                  "dnr_jax.serving.triton": ["backend.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2",
        "chex>=0.1.88",
        "orbax-checkpoint>=0.11",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.7",
        "grain>=0.2.18",  # --input=disk: training lists read from disk (runtime/disk_input)
        "pyarrow>=15",
        "etils[epath]>=1.7",
        "importlib_resources>=6",  # TFDS download manager needs it, does not declare it
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "scipy>=1.11",
        "flatbuffers>=24",  # jax.export serialization (the exported reranker)
    ],
    extras_require={
        # Without the serve extra its tests (tests/onnx_export_test.py) skip; CI runs
        # them after the suite with it installed (.ci/run): jax2onnx and tritonclient
        # pin orbax-checkpoint, ml_dtypes and protobuf below their newest releases,
        # which the library's own tests then do not run against.
        "test": ["pytest>=8", "pytest-xdist>=3", "scikit-learn>=1.4", "hypothesis>=6"],
        "serve": SERVE,
        # benchmarks/torch_prm.py, the PyTorch eager reference of benchmarks/step.py
        # --compare_torch; never a dependency of the library.
        "bench": ["torch>=2.1"],
        # benchmarks/serving_engines.py --engines=mosec (a Rust HTTP server and batcher
        # in front of Python workers; no dependencies of its own). Ray Serve and
        # BentoML pin too much to share the project's environment: their own
        # virtualenvs (docs/serving.md).
        "engines": ["mosec>=0.9.8"],
        # Preparing a split of more than 1 GB (millions of lists): TFDS's writer
        # spills it through TensorFlow's file API (dnr_jax/data/raw.py).
        "large": ["tensorflow-cpu>=2.16"],
        # The docs site (mkdocs.yml): ``mkdocs serve``, ``mkdocs build --strict``.
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9"],
    },
)
