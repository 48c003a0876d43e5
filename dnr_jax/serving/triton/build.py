"""The raw-ids backend (``backend.cc``), compiled once per source and ONNX Runtime.

Needs a C++17 compiler and RapidJSON's headers (Debian: ``g++ rapidjson-dev``),
Triton's core headers and ONNX Runtime's C API header (``sources``). The library
goes into a cache folder named by a hash of the source and the ONNX Runtime library
it links, beside a copy of that library (found through the backend's ``$ORIGIN``
run path), so a server needs nothing else of this package.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata

from dnr_jax.serving.triton import sources as sources_lib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend.cc")
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dnr_jax",
                           "triton-dnr-backend")
LIBRARY = "libtriton_dnr.so"
RAPIDJSON = "/usr/include/rapidjson/document.h"
_TRITON_HEADER = ("core", "include", "triton", "core", "tritonbackend.h")


# Without -DNDEBUG RapidJSON's asserts stay on: the backend checks each value's type
# before it reads it, so an assert that fires is a bug to see, not a request's doing.
FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-sign-compare")


def non_printable_ranges() -> list[tuple[int, int]]:
  """The code point ranges where this Python's ``str.isprintable()`` is False: the
  characters ``repr`` escapes, which the backend's error lines escape alike."""
  ranges, start = [], None
  for cp in range(sys.maxunicode + 1):
    if not chr(cp).isprintable():
      if start is None:
        start = cp
    elif start is not None:
      ranges.append((start, cp - 1))
      start = None
  if start is not None:
    ranges.append((start, sys.maxunicode))
  return ranges


def _key(library: str, headers: str) -> str:
  digest = hashlib.sha256()
  for path in (SOURCE, RAPIDJSON, os.path.join(headers, *_TRITON_HEADER),
               os.path.join(headers, sources_lib.HEADER)):
    with open(path, "rb") as f:
      digest.update(f.read())
  digest.update(os.path.realpath(library).encode())
  digest.update(" ".join(FLAGS).encode())
  digest.update(unicodedata.unidata_version.encode())
  return digest.hexdigest()[:16]


def built(directory: str = DEFAULT_DIR, source_dir: str | None = None) -> str:
  """The folder of the built backend (``libtriton_dnr.so`` and ONNX Runtime's
  library), compiled first where this source has not been. Several processes may
  ask at once: one compiles, under a lock.

  Args:
    directory: the cache.
    source_dir: Triton's and ONNX Runtime's headers (``sources.sources``; default
      its cache, filled from the network where missing).

  Raises:
    sources.Unavailable: a compiler, RapidJSON's headers or a source cannot be had.
    sources.BuildError: the compiler failed (its output in the message).
  """
  library = sources_lib.onnxruntime_library()
  if shutil.which("c++") is None:
    raise sources_lib.Unavailable("building the dnr backend needs a C++17 compiler "
                                  "(Debian: apt-get install g++)")
  if not os.path.exists(RAPIDJSON):
    raise sources_lib.Unavailable("building the dnr backend needs RapidJSON's headers "
                                  "(Debian: apt-get install rapidjson-dev)")
  headers = sources_lib.sources(source_dir or sources_lib.DEFAULT_DIR)
  out = os.path.join(directory, _key(library, headers))
  try:
    os.makedirs(directory, exist_ok=True)
    lock = open(os.path.join(directory, "lock"), "w")
  except OSError as e:
    raise sources_lib.Unavailable(f"cannot write the backend's cache {directory}: "
                                  f"{e.strerror}") from e
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(os.path.join(out, LIBRARY)):
      return out
    shutil.rmtree(out, ignore_errors=True)   # a build interrupted before its rename
    tmp = tempfile.mkdtemp(dir=directory)
    try:
      with open(os.path.join(tmp, "dnr_printable.inc"), "w") as f:
        f.write("const uint32_t kNonPrintable[][2] = {\n")
        f.writelines(f"    {{{a}, {b}}},\n" for a, b in non_printable_ranges())
        f.write("};\n")
      cmd = ["c++", *FLAGS, "-I" + tmp,
             "-I" + os.path.join(headers, "core", "include"),
             "-I" + os.path.dirname(os.path.join(headers, sources_lib.HEADER)),
             SOURCE, "-o", os.path.join(tmp, LIBRARY), library, "-Wl,-rpath,$ORIGIN"]
      got = subprocess.run(cmd, capture_output=True, text=True)
      if got.returncode:
        raise sources_lib.BuildError(f"{' '.join(cmd)} failed:\n{got.stderr[-3000:]}")
      shutil.copy2(library, os.path.join(tmp, "libonnxruntime.so.1"))
      os.remove(os.path.join(tmp, "dnr_printable.inc"))
      os.replace(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return out
