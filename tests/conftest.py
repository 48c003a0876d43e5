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

# Tests run tiny models: compile time dominates, and optimisation buys nothing.
jax.config.update("jax_disable_most_optimizations", True)
