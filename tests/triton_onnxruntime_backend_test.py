"""The ONNX Runtime backend's build helper: what it reuses and installs.

No network and no compiler here: git is replaced by a script, and the build by a
folder laid out as a build leaves it. What it fetches is
``triton_sources_test``'s. That the built backend serves the exported
repository is ``onnx_export_test``'s.
"""

import os

import pytest

import fake_git  # pylint: disable=g-bad-import-order  (tests/fake_git.py)

from benchmarks import triton_onnxruntime_backend as backend


def test_built_reuses_the_cache_without_sources(tmp_path, monkeypatch):
  log = fake_git.fake_git(tmp_path, monkeypatch, 1)
  out = tmp_path / "cache" / "onnxruntime"
  out.mkdir(parents=True)
  (out / "libtriton_onnxruntime.so").write_bytes(b"built")
  assert backend.built(str(tmp_path / "cache")) == str(out)
  assert not log.exists() and not (tmp_path / "cache" / "sources").exists()


def test_install_links_the_wheels_server_library(tmp_path):
  built = tmp_path / "built"
  built.mkdir()
  for name in ("libtriton_onnxruntime.so", "libonnxruntime.so.1"):
    (built / name).write_bytes(name.encode())
  wheel = tmp_path / "wheel"
  (wheel / "nvidia_pytriton.libs").mkdir(parents=True)
  server = wheel / "nvidia_pytriton.libs" / "libtritonserver-0a1b2c3d.so"
  server.write_bytes(b"server")
  backend.install(str(tmp_path / "work"), str(wheel), str(built))
  target = tmp_path / "work" / "backends" / "onnxruntime"
  assert sorted(os.listdir(target)) == ["libonnxruntime.so.1",
                                        "libtriton_onnxruntime.so",
                                        "libtritonserver.so"]
  assert os.readlink(target / "libtritonserver.so") == str(server)
  assert (target / "libtriton_onnxruntime.so").read_bytes() == b"libtriton_onnxruntime.so"


def test_install_refuses_a_wheel_without_the_server_library(tmp_path):
  (tmp_path / "built").mkdir()
  (tmp_path / "wheel").mkdir()
  with pytest.raises(RuntimeError, match="expected one libtritonserver-.*found 0"):
    backend.install(str(tmp_path / "work"), str(tmp_path / "wheel"),
                    str(tmp_path / "built"))
  assert not (tmp_path / "work").exists()
