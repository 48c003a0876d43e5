"""dnr_jax/runtime/host_allocator.py: applied on CPU before JAX starts, refused after."""

import os
import subprocess
import sys

import pytest

from dnr_jax.runtime import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> str:
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                        capture_output=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT, **env))
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip()


def test_bad_mode_is_an_error():
  with pytest.raises(ValueError, match="'fast'"):
    host_allocator.configure("fast")


def test_system_changes_nothing():
  assert host_allocator.configure("system") == "system allocator (unchanged)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_auto_on_cpu_before_jax_starts_then_steps_run():
  out = _run("from dnr_jax.runtime import host_allocator as h; print(h.configure('auto')); "
             "import jax.numpy as jnp; print(float((jnp.ones((512, 512)) @ "
             "jnp.ones((512, 512))).sum()))", JAX_PLATFORMS="cpu")
  assert out.splitlines() == [
      "reuse freed memory (glibc: one arena, no mmap, no trim)", str(512.0 ** 3)]


def test_auto_leaves_accelerators_alone_and_late_calls_are_refused():
  out = _run("from dnr_jax.runtime import host_allocator as h; print(h.configure('auto'))",
             JAX_PLATFORMS="cuda")
  assert out == "system allocator (an accelerator computes)"
  out = _run("import jax; jax.devices(); from dnr_jax.runtime import host_allocator as h; "
             "print(h.configure('reuse'))", JAX_PLATFORMS="cpu")
  assert "already started" in out
