"""Test-wide JAX settings: CPU, 8 fake devices, and cheap compilation (child_env.py).

XLA_FLAGS must be set before JAX is imported anywhere, which is why this lives in
conftest.py: every test sees 8 host devices, and single-device tests pick one.
"""

import os

import child_env  # tests/child_env.py: no JAX imported

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = child_env.xla_flags(8, os.environ.get("XLA_FLAGS", ""))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests run tiny models: compile time dominates, and optimisation buys nothing.
jax.config.update("jax_disable_most_optimizations", True)
# Many tests compile the same programs (same tiny configs); a persistent cache shared
# by the pytest-xdist workers of one run compiles each once.
if "DNR_TEST_COMPILE_CACHE" not in os.environ:   # set once, before the workers start
  os.environ["DNR_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="dnr-jax-xla-cache-")
_cache = os.environ["DNR_TEST_COMPILE_CACHE"]
jax.config.update("jax_compilation_cache_dir", _cache)
# Every program: at the suite's compile times most take under a second.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

