"""The ONNX Runtime backend's build helper: what it fetches, reuses and installs.

No network and no compiler here: git is replaced by a script, and the build by a
folder laid out as a build leaves it. That the built backend serves the exported
repository is ``onnx_export_test``'s.
"""

import os
import stat

import pytest

from benchmarks import triton_onnxruntime_backend as backend


def _fill(directory, skip=()):
  for name in backend.REPOSITORIES:
    if name not in skip:
      os.makedirs(os.path.join(directory, name))
  if backend.HEADER not in skip:
    os.makedirs(os.path.dirname(os.path.join(directory, backend.HEADER)))
    with open(os.path.join(directory, backend.HEADER), "w") as f:
      f.write("#define ORT_API_VERSION 19\n")


def _fake_git(tmp_path, monkeypatch, exit_code):
  """``git`` on the PATH as a script that logs its arguments and exits; exiting 0,
  it makes the folder a clone would (its last argument), and fails as git does
  if that folder is already there."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  git = bin_dir / "git"
  clone = ('for a; do dest=$a; done\n'
           '[ -e "$dest" ] && { echo "fatal: destination path exists" >&2; exit 128; }\n'
           'mkdir -p "$dest"\n' if exit_code == 0 else
           'echo "fatal: unable to access" >&2\n')
  git.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/git.log\n{clone}exit {exit_code}\n')
  git.chmod(git.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return tmp_path / "git.log"


def test_missing_names_each_absent_source(tmp_path):
  assert backend.missing(str(tmp_path)) == [*backend.REPOSITORIES, backend.HEADER]
  _fill(str(tmp_path), skip=("core",))
  assert backend.missing(str(tmp_path)) == ["core"]


def test_sources_present_fetches_nothing(tmp_path, monkeypatch):
  log = _fake_git(tmp_path, monkeypatch, 1)
  _fill(str(tmp_path / "src"))
  assert backend.sources(str(tmp_path / "src")) == str(tmp_path / "src")
  assert not log.exists()


def test_a_failed_clone_names_the_repository_and_the_folder_to_fill(tmp_path,
                                                                   monkeypatch):
  log = _fake_git(tmp_path, monkeypatch, 128)
  src = tmp_path / "src"
  _fill(str(src), skip=("backend",))
  with pytest.raises(backend.Unavailable, match=r"git clone .*/backend failed: fatal: "
                     r"unable to access; put it \(branch r24\.10\) at .*src/backend"):
    backend.sources(str(src))
  (args,) = log.read_text().splitlines()
  assert "--branch r24.10" in args and args.endswith(f"backend.git {src}/backend.part")
  assert not (src / "backend.part").exists() and not (src / "backend").exists()


def test_a_clone_left_half_done_is_cloned_again(tmp_path, monkeypatch):
  log = _fake_git(tmp_path, monkeypatch, 0)
  src = tmp_path / "src"
  _fill(str(src), skip=("core",))
  (src / "core.part").mkdir()                  # an earlier clone, interrupted
  (src / "core.part" / "half").write_text("")
  backend.sources(str(src))
  assert (src / "core").is_dir() and not (src / "core" / "half").exists()
  assert not (src / "core.part").exists()
  assert len(log.read_text().splitlines()) == 1


def test_a_failed_header_download_leaves_nothing_behind(tmp_path, monkeypatch):
  import http.client  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  class CutShort(io.BytesIO):
    def read(self, *args):
      raise http.client.IncompleteRead(b"#define", 100)

    def __exit__(self, *args):
      return False

  monkeypatch.setattr(backend.urllib.request, "urlopen",
                      lambda *args, **kwargs: CutShort())
  src = tmp_path / "src"
  _fill(str(src), skip=(backend.HEADER,))
  with pytest.raises(backend.Unavailable, match="IncompleteRead.*put "
                     "onnxruntime_c_api.h at .*src/onnxruntime/include"):
    backend.sources(str(src))
  assert os.listdir(src / "onnxruntime" / "include") == []


def test_built_reuses_the_cache_without_sources(tmp_path, monkeypatch):
  log = _fake_git(tmp_path, monkeypatch, 1)
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
