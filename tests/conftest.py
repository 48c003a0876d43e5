"""Test-wide JAX settings: CPU, 8 fake devices, and cheap compilation.

XLA_FLAGS must be set before JAX is imported anywhere, which is why this lives in
conftest.py: every test sees 8 host devices, and single-device tests pick one.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests run tiny models: compile time dominates, and optimisation buys nothing.
jax.config.update("jax_disable_most_optimizations", True)
# Many tests compile the same programs (same tiny configs); a persistent cache shared
# by the pytest-xdist workers of one run compiles each once.
_cache = os.environ.setdefault("DNR_TEST_COMPILE_CACHE",
                               tempfile.mkdtemp(prefix="dnr-jax-xla-cache-"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
