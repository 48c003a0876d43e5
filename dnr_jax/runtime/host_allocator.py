"""Host memory allocator settings for XLA:CPU: keep freed step buffers for reuse.

Why (measured, ``docs/dnr_investigation.md``, "Where the CPU step's time went"): each
call of a compiled step on XLA:CPU allocates its temporary buffer afresh (660 MB for
the PRM backbone step at batch 256) and frees it at the end. glibc's ``malloc``
serves blocks that large with ``mmap`` and returns them with ``munmap`` (its mmap
threshold cannot exceed 32 MB), so every step page-faults and zeroes all of that
memory again: about a quarter of the step's time went to the kernel
(``perf record``: ``exc_page_fault``, ``clear_page_erms``, ``unmap_page_range``).
Telling glibc to serve large blocks from its heap, never to trim it, and to use one
arena (XLA's worker threads would otherwise fall back to ``mmap`` in their own
arenas) makes the second step reuse the first step's pages: the backbone step ran
1.2-1.3x faster at the issue-12 shapes.

The cost: memory freed by the process stays with it (the peak resident size is what
the run needed anyway; it is not returned to the OS until the process exits), and
one malloc arena serialises the allocations of concurrent threads (a handful in a
training job). So this is for batch jobs on CPU, and ``configure`` applies it only
when the computation will run on the CPU.

``configure`` must run before JAX creates its CPU thread pools (before the first
computation or ``jax.devices()``): threads made earlier keep their own arenas. The
binaries call it first thing (``experiments/cli.py``, ``benchmarks/step.py``);
library users call it themselves, or set the equivalent glibc environment
variables (``ENV``) before Python starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from typing import Optional

MODES = ("auto", "reuse", "system")
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The same settings as environment variables, for a process started from a shell.
ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
       "MALLOC_TRIM_THRESHOLD_": "18446744073709551615"}
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")

_applied: Optional[str] = None


def cpu_only() -> bool:
  """Whether JAX will compute on the CPU, decided without starting a JAX backend.

  ``JAX_PLATFORMS`` decides when set; otherwise no accelerator plugin installed
  means the CPU.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_PLUGINS)


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(getattr(xla_bridge, "_backends", None))
  except Exception:  # pylint: disable=broad-except
    return False


def applied() -> str:
  """What this process's allocator does now (for logs and benchmark records)."""
  return _applied or "system allocator (unchanged)"


def configure(mode: str = "auto") -> str:
  """Applies the allocator settings; returns what was done, for the log.

  Args:
    mode: ``"reuse"`` applies them; ``"system"`` leaves the allocator alone;
      ``"auto"`` applies them where the computation runs on the CPU (``cpu_only``).

  Returns:
    A short description: ``"reuse (glibc: ...)"`` or why nothing was changed.

  Raises:
    ValueError: an unknown ``mode``.
  """
  global _applied
  if mode not in MODES:
    raise ValueError(f"host allocator mode {mode!r} is not one of {list(MODES)}")
  if _applied is not None:
    return _applied
  if mode == "system":
    return "system allocator (unchanged)"
  if mode == "auto" and not cpu_only():
    return "system allocator (an accelerator computes)"
  if _backend_started():
    return ("system allocator (JAX's backend had already started; call "
            "host_allocator.configure() first)")
  name = ctypes.util.find_library("c")
  if not sys.platform.startswith("linux") or not name:
    return "system allocator (not glibc)"
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return "system allocator (no mallopt)"
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # -1 for the trim threshold turns trimming off (mallopt(3)).
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _applied = ("reuse freed memory (glibc: one arena, no mmap, no trim)" if ok
              else "system allocator (mallopt refused)")
  return _applied
