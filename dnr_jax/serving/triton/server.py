"""Triton Inference Server 2.51's ``tritonserver``, from the nvidia-pytriton wheel.

Triton is not on the registry as a server, but the nvidia-pytriton 0.6.0 wheel
carries its ``tritonserver`` binary (Triton 2.51, which runs on a CPU-only machine:
CUDA and DCGM fail to start and are not needed) and the libraries it needs. Only
those binaries are used, never PyTriton's Python package (which requires
NumPy < 2, where JAX needs NumPy 2). ``unpacked_wheel`` downloads the wheel
(``pip download --no-deps``) and unpacks it once; ``command`` and ``environment``
run the server. In a Triton container, its own ``tritonserver`` serves the same
repository (``--backend-directory`` holding the ``dnr`` backend).
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from typing import Optional

WHEEL = "nvidia-pytriton==0.6.0"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dnr_jax",
                           "nvidia-pytriton-0.6.0")
SERVER = ("pytriton", "tritonserver")


def binary(wheel: str) -> str:
  """The ``tritonserver`` of the unpacked ``wheel``."""
  return os.path.join(wheel, *SERVER, "bin", "tritonserver")


def unpacked_wheel(directory: str = DEFAULT_DIR) -> str:
  """``directory`` holding the unpacked wheel; downloaded and unpacked if missing.

  Several processes may ask at once (test workers): one downloads under a lock, and
  the wheel is unpacked beside ``directory`` and renamed into place, so no process
  sees half of it.

  Raises:
    RuntimeError: the wheel could not be downloaded or unpacked.
  """
  parent = os.path.dirname(os.path.abspath(directory)) or "."
  os.makedirs(parent, exist_ok=True)
  with open(os.path.abspath(directory) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(binary(directory)):
      with tempfile.TemporaryDirectory(dir=parent) as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                              "-q", WHEEL, "-d", tmp], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if got.returncode or not wheels:
          raise RuntimeError(f"pip download {WHEEL} failed: "
                             f"{(got.stderr or got.stdout).strip()[-500:]}")
        unpacked = os.path.join(tmp, "unpacked")
        try:
          with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(unpacked)
        except (zipfile.BadZipFile, OSError) as e:
          raise RuntimeError(f"unpacking {wheels[0]} failed: {e}") from e
        for path in (binary(unpacked),
                     *glob.glob(os.path.join(unpacked, *SERVER, "python_backend_stubs",
                                             "*", "triton_python_backend_stub"))):
          os.chmod(path, 0o755)   # zip files keep no modes
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(unpacked, directory)
  return directory


def environment(wheel: str) -> dict:
  """The environment ``tritonserver`` runs in: the wheel's libraries (and this
  Python's, for the Python backend) on the loader's path."""
  # An empty entry would make the loader search the working directory.
  paths = [sysconfig.get_config_var("LIBDIR"), os.path.join(wheel, "nvidia_pytriton.libs"),
           *os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)]
  return dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(p for p in paths if p))


def command(work: str, wheel: str, *, port: int, host: str = "127.0.0.1",
            metrics_port: Optional[int] = None, exit_timeout_s: int = 5,
            quiet: bool = True) -> list[str]:
  """``tritonserver`` serving ``work/repo`` with the backends of ``work/backends``:
  HTTP on ``host:port`` only (no gRPC), Prometheus metrics on ``metrics_port``
  (None: none), ``exit_timeout_s`` to answer the requests in flight on SIGTERM."""
  metrics = (["--allow-metrics=true", f"--metrics-port={metrics_port}",
              f"--metrics-address={host}", "--allow-gpu-metrics=false",
              "--allow-cpu-metrics=false"]
             if metrics_port is not None else ["--allow-metrics=false"])
  return [binary(wheel), f"--model-repository={work}/repo",
          f"--backend-directory={work}/backends", f"--http-port={port}",
          f"--http-address={host}", "--allow-grpc=false", *metrics,
          f"--exit-timeout-secs={exit_timeout_s}",
          *(["--log-info=false", "--log-warning=false"] if quiet else [])]
