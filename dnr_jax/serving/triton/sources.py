"""What building a Triton backend here needs: Triton's headers, ONNX Runtime's C API
header and library.

Triton Inference Server's backend API (``triton/core/tritonbackend.h``) is in the
``core`` repository of triton-inference-server, and ONNX Runtime's C API in one
header; neither is on a package registry. ``sources`` clones the repositories
(git, branch ``r24.10``, Triton 2.51's release, never prompting, ``CLONE_TIMEOUT_S``
at most) and downloads the header (ONNX Runtime ``v1.19.2``, API version 19) into a
folder, once; where there is no network, each failure names the folder to fill by
hand. The ONNX Runtime library is the ``onnxruntime`` wheel's, which serves every
older API version.
"""

from __future__ import annotations

import glob
import http.client
import os
import shutil
import subprocess
import urllib.request
from typing import Sequence

from dnr_jax import errors

BRANCH = "r24.10"
ORT_TAG = "v1.19.2"
HEADER = os.path.join("onnxruntime", "include", "onnxruntime_c_api.h")
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dnr_jax",
                           f"triton-sources-{BRANCH}")
_GITHUB = "https://github.com/triton-inference-server"
_HEADER_URL = ("https://raw.githubusercontent.com/microsoft/onnxruntime/"
               f"{ORT_TAG}/include/onnxruntime/core/session/onnxruntime_c_api.h")
# A clone that has not finished by then is taken as no network (a filtered one can
# leave a connection waiting far longer).
CLONE_TIMEOUT_S = 120


class Unavailable(errors.DNRError, RuntimeError):
  """A source or a tool a build needs cannot be had here; the message says which,
  and where to put it by hand."""


class BuildError(errors.DNRError, RuntimeError):
  """The compiler (or cmake) failed on sources and tools that were all there."""


def missing(directory: str, repositories: Sequence[str] = ("core",)) -> list[str]:
  """What ``directory`` lacks of ``repositories`` and the header (paths under it)."""
  return [p for p in [*repositories, HEADER]
          if not os.path.exists(os.path.join(directory, p))]


def _download_header(target: str) -> None:
  os.makedirs(os.path.dirname(target), exist_ok=True)
  try:
    with urllib.request.urlopen(_HEADER_URL, timeout=60) as r, \
        open(target + ".part", "wb") as f:
      shutil.copyfileobj(r, f)
  except (OSError, http.client.HTTPException) as e:
    if os.path.exists(target + ".part"):
      os.remove(target + ".part")
    raise Unavailable(f"could not download {_HEADER_URL} ({e!r}); put "
                      f"onnxruntime_c_api.h at {target}") from e
  os.replace(target + ".part", target)


def _clone(name: str, target: str) -> None:
  if shutil.which("git") is None:
    raise Unavailable(f"git is not installed; put {_GITHUB}/{name} "
                      f"(branch {BRANCH}) at {target}")
  shutil.rmtree(target + ".part", ignore_errors=True)   # an interrupted clone's
  try:   # never a prompt for credentials
    got = subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", BRANCH,
                          f"{_GITHUB}/{name}.git", target + ".part"],
                         capture_output=True, text=True, timeout=CLONE_TIMEOUT_S,
                         env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
  except subprocess.TimeoutExpired:
    got = subprocess.CompletedProcess([], 1, "", f"no answer in {CLONE_TIMEOUT_S} s")
  if got.returncode:
    shutil.rmtree(target + ".part", ignore_errors=True)
    raise Unavailable(f"git clone {_GITHUB}/{name} failed: "
                      f"{got.stderr.strip()[-300:]}; put it (branch {BRANCH}) "
                      f"at {target}")
  os.replace(target + ".part", target)


def sources(directory: str = DEFAULT_DIR,
            repositories: Sequence[str] = ("core",)) -> str:
  """``directory`` with ``repositories`` (triton-inference-server's, branch
  ``r24.10``) and ONNX Runtime's C API header in place; what is missing is cloned
  or downloaded.

  Raises:
    Unavailable: something could not be fetched; the message names it, and the
      folder to fill by hand.
  """
  os.makedirs(directory, exist_ok=True)
  for name in missing(directory, repositories):
    target = os.path.join(directory, name)
    if name == HEADER:
      _download_header(target)
    else:
      _clone(name, target)
  return directory


def onnxruntime_library() -> str:
  """The ONNX Runtime library of the installed ``onnxruntime`` wheel."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Unavailable(f"onnxruntime is not installed (the serve extra: pip install "
                      f"-e \".[serve]\"): {e}") from e
  found = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi",
                                        "libonnxruntime.so.1*")))
  if not found:
    raise Unavailable("the onnxruntime wheel has no libonnxruntime.so.1.* "
                      f"({onnxruntime.__file__})")
  return found[-1]
