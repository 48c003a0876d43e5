"""The settings every JAX process of the suite runs with, and the environment of the
ones that tests start (not a test file itself; imports no JAX).

The suite's models are tiny, so XLA's compile time is most of its time. Two settings
cut it:

* ``jax_disable_most_optimizations``: XLA's optimisation passes buy nothing here;
* ``--xla_cpu_use_fusion_emitters=false``: XLA's CPU backend emits its fusions with
  the older elemental emitters, which compile a tiny model's steps in under half the
  time (``docs/development.md`` has the measurement). They round differently from
  the default ones, which is why every process of the suite uses them: a test that
  compares two runs compares programs built alike.

Every process of one run also shares one persistent compilation cache
(``DNR_TEST_COMPILE_CACHE``), so a program that several tests or child processes
compile is compiled once.
"""

import os

FAST_COMPILE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int = 0, base: str = "") -> str:
  """``base`` plus the fast-compile flags, and ``devices`` host devices if > 0."""
  flags = base.split()
  if FAST_COMPILE_XLA_FLAGS not in flags:
    flags.append(FAST_COMPILE_XLA_FLAGS)
  if devices and not any("xla_force_host_platform_device_count" in f for f in flags):
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def jax_child_env(devices: int = 0, **extra: str) -> dict:
  """The environment of a JAX process a test starts: CPU, the suite's compile settings
  and cache, and ``devices`` host devices (0: the parent's count, 8 under the suite;
  -1: none asked for, so one, or what the child asks for itself)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("DNR_TEST_COMPILE_CACHE", ""),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  base = os.environ.get("XLA_FLAGS", "") if devices == 0 else ""
  env["XLA_FLAGS"] = xla_flags(max(devices, 0), base)
  env.update(extra)
  return env
