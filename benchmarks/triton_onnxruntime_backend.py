"""Triton's ONNX Runtime backend, built from source for ``triton_server``'s Triton.

The nvidia-pytriton 0.6.0 wheel that brings Triton 2.51 here (``triton_server``)
carries only the Python backend. The ONNX Runtime backend of the same release
(branch ``r24.10``) builds from source, CPU only, from:

* four triton-inference-server repositories at ``r24.10``: ``onnxruntime_backend``,
  ``backend``, ``core`` and ``common`` (``SOURCES/<name>``);
* ONNX Runtime's C API header (``SOURCES/onnxruntime/include/onnxruntime_c_api.h``;
  the backend includes nothing else of ONNX Runtime), ONNX Runtime 1.19's (API
  version 19; built and tested with it). The backend asks the library for the
  header's API version, so the library must be that version or newer;
* the ONNX Runtime library that the ``onnxruntime`` wheel ships
  (``onnxruntime/capi/libonnxruntime.so.1.*``), which serves every older API version;
* cmake, a C++17 compiler and RapidJSON's headers (Debian: ``cmake g++
  rapidjson-dev``).

``dnr_jax.serving.triton.sources`` clones what is missing from GitHub (git,
network) into ``SOURCES`` (its ``DEFAULT_DIR``); where there is no network, fill
``SOURCES`` by hand. ``built`` builds once into a cache folder, under
a lock; ``install`` puts the backend in a server's ``backends/``. What cannot be had
here (a source, a tool) raises ``Unavailable``; a build that fails, ``BuildError``.

The wheel renames ``libtritonserver.so`` (``libtritonserver-<hash>.so``); the
backend asks for the plain name, so ``install`` links that name to the wheel's file
in the backend's folder (the backend finds it through its ``$ORIGIN`` run path, and
the loader sees the file the server already loaded, so it is not loaded twice).
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import tempfile

from dnr_jax.serving.triton import sources as sources_lib

REPOSITORIES = ("onnxruntime_backend", "backend", "core", "common")
HEADER = sources_lib.HEADER
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dnr_jax",
                           f"triton-onnxruntime-backend-{sources_lib.BRANCH}")
_LIBRARY = "libtriton_onnxruntime.so"
Unavailable, BuildError = sources_lib.Unavailable, sources_lib.BuildError
onnxruntime_library = sources_lib.onnxruntime_library


def _tools() -> None:
  lacking = [t for t in ("cmake", "make", "c++") if shutil.which(t) is None]
  if not os.path.exists("/usr/include/rapidjson/document.h"):
    lacking.append("RapidJSON's headers")
  if lacking:
    raise Unavailable(f"building the ONNX Runtime backend needs {', '.join(lacking)} "
                      "(Debian: apt-get install cmake g++ rapidjson-dev)")


def _build(source_dir: str, out: str, log) -> None:
  """Configures, builds and installs the backend from ``source_dir``'s sources into
  ``out`` (the backend library and a copy of ONNX Runtime's)."""
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "src")
    for name in REPOSITORIES:
      shutil.copytree(os.path.join(source_dir, name), os.path.join(src, name),
                      ignore=shutil.ignore_patterns(".git"))
    # common's unit tests fetch googletest from the network while configuring; the
    # backend needs none of them.
    tests = os.path.join(src, "common", "src", "CMakeLists.txt")
    with open(tests) as f:
      text = f.read()
    if "add_subdirectory(test)" not in text:
      raise BuildError(f"{tests} no longer adds its tests as this build expects "
                       f"(branch {sources_lib.BRANCH} moved?)")
    with open(tests, "w") as f:
      f.write(text.replace("add_subdirectory(test)", ""))
    ort = os.path.join(tmp, "ort")
    os.makedirs(os.path.join(ort, "lib"))
    shutil.copy2(os.path.join(source_dir, HEADER), ort)
    library = onnxruntime_library()
    os.symlink(library, os.path.join(ort, "lib", "libonnxruntime.so"))
    os.symlink(library, os.path.join(ort, "lib", "libonnxruntime.so.1"))
    build = os.path.join(tmp, "build")
    os.makedirs(build)
    steps = [
        ["cmake", os.path.join(src, "onnxruntime_backend"), "-Wno-dev",
         "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_INSTALL_PREFIX={tmp}/install",
         "-DTRITON_ENABLE_GPU=OFF", "-DTRITON_ENABLE_ONNXRUNTIME_TENSORRT=OFF",
         "-DTRITON_ENABLE_ONNXRUNTIME_OPENVINO=OFF",
         f"-DTRITON_ONNXRUNTIME_INCLUDE_PATHS={ort}",
         f"-DTRITON_ONNXRUNTIME_LIB_PATHS={ort}/lib",
         "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
         *(f"-DFETCHCONTENT_SOURCE_DIR_REPO-{name.upper()}={src}/{name}"
           for name in ("common", "core", "backend"))],
        ["make", f"-j{os.cpu_count() or 1}", "install"]]
    for step in steps:
      log.write(f"$ {' '.join(step)}\n".encode())
      log.flush()
      if subprocess.run(step, cwd=build, stdout=log, stderr=log).returncode:
        raise BuildError(f"{step[0]} failed; its output is in {log.name}")
    os.makedirs(out)
    shutil.copy2(os.path.join(tmp, "install", "backends", "onnxruntime", _LIBRARY), out)
    shutil.copy2(library, os.path.join(out, "libonnxruntime.so.1"))


def built(directory: str = DEFAULT_DIR, source_dir: str | None = None) -> str:
  """The folder of the built backend (``directory/onnxruntime``), built first if it
  is missing, from ``source_dir`` (default ``sources.DEFAULT_DIR``, filled by
  ``sources.sources``). Several processes may ask at once: one builds, under a lock.

  Raises:
    Unavailable: a source could not be had, or a tool is missing.
    BuildError: the build failed (its log: ``directory/build.log``).
  """
  out = os.path.join(directory, "onnxruntime")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(out, _LIBRARY)):
      _tools()
      source_dir = sources_lib.sources(source_dir or sources_lib.DEFAULT_DIR,
                                       REPOSITORIES)
      for stale in (out, out + ".part"):
        shutil.rmtree(stale, ignore_errors=True)
      with open(os.path.join(directory, "build.log"), "wb") as log:
        _build(source_dir, out + ".part", log)
      os.replace(out + ".part", out)
  return out


def install(work: str, wheel: str, backend: str) -> None:
  """``backend`` (``built``'s folder) as ``work/backends/onnxruntime``, for the
  server of the unpacked ``wheel`` (``triton_server.start(work, wheel, ...)``)."""
  found = glob.glob(os.path.join(os.path.abspath(wheel), "nvidia_pytriton.libs",
                                 "libtritonserver-*.so"))
  if len(found) != 1:
    raise RuntimeError(f"expected one libtritonserver-*.so in {wheel}/"
                       f"nvidia_pytriton.libs, found {len(found)}")
  target = os.path.join(work, "backends", "onnxruntime")
  shutil.copytree(backend, target)
  os.symlink(found[0], os.path.join(target, "libtritonserver.so"))
