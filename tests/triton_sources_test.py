"""Fetching the headers a Triton backend compiles against (dnr_jax.serving.triton.sources).

No network here: git is replaced by a script, and the header's download by a
response cut short.
"""

import os

import pytest

import fake_git  # pylint: disable=g-bad-import-order  (tests/fake_git.py)

from dnr_jax.serving.triton import sources

# The four repositories Triton's ONNX Runtime backend builds from
# (benchmarks/triton_onnxruntime_backend.py); the dnr backend needs "core" alone.
REPOSITORIES = ("onnxruntime_backend", "backend", "core", "common")


def _fill(directory, skip=()):
  for name in REPOSITORIES:
    if name not in skip:
      os.makedirs(os.path.join(directory, name))
  if sources.HEADER not in skip:
    os.makedirs(os.path.dirname(os.path.join(directory, sources.HEADER)))
    with open(os.path.join(directory, sources.HEADER), "w") as f:
      f.write("#define ORT_API_VERSION 19\n")


def test_missing_names_each_absent_source(tmp_path):
  assert sources.missing(str(tmp_path), REPOSITORIES) == [*REPOSITORIES, sources.HEADER]
  _fill(str(tmp_path), skip=("core",))
  assert sources.missing(str(tmp_path), REPOSITORIES) == ["core"]


def test_sources_present_fetches_nothing(tmp_path, monkeypatch):
  log = fake_git.fake_git(tmp_path, monkeypatch, 1)
  _fill(str(tmp_path / "src"))
  assert sources.sources(str(tmp_path / "src"), REPOSITORIES) == str(tmp_path / "src")
  assert not log.exists()


def test_a_failed_clone_names_the_repository_and_the_folder_to_fill(tmp_path,
                                                                   monkeypatch):
  log = fake_git.fake_git(tmp_path, monkeypatch, 128)
  src = tmp_path / "src"
  _fill(str(src), skip=("backend",))
  with pytest.raises(sources.Unavailable, match=r"git clone .*/backend failed: fatal: "
                     r"unable to access; put it \(branch r24\.10\) at .*src/backend"):
    sources.sources(str(src), REPOSITORIES)
  (args,) = log.read_text().splitlines()
  assert "--branch r24.10" in args and args.endswith(f"backend.git {src}/backend.part")
  assert not (src / "backend.part").exists() and not (src / "backend").exists()


def test_a_clone_left_half_done_is_cloned_again(tmp_path, monkeypatch):
  log = fake_git.fake_git(tmp_path, monkeypatch, 0)
  src = tmp_path / "src"
  _fill(str(src), skip=("core",))
  (src / "core.part").mkdir()                  # an earlier clone, interrupted
  (src / "core.part" / "half").write_text("")
  sources.sources(str(src), REPOSITORIES)
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

  monkeypatch.setattr(sources.urllib.request, "urlopen",
                      lambda *args, **kwargs: CutShort())
  src = tmp_path / "src"
  _fill(str(src), skip=(sources.HEADER,))
  with pytest.raises(sources.Unavailable, match="IncompleteRead.*put "
                     "onnxruntime_c_api.h at .*src/onnxruntime/include"):
    sources.sources(str(src), REPOSITORIES)
  assert os.listdir(src / "onnxruntime" / "include") == []


def test_the_dnr_backend_needs_only_core_and_the_header(tmp_path):
  assert sources.missing(str(tmp_path)) == ["core", sources.HEADER]


def test_unavailable_is_a_user_error_of_one_line():
  from dnr_jax import errors  # pylint: disable=g-import-not-at-top
  assert issubclass(sources.Unavailable, errors.DNRError)
  assert issubclass(sources.BuildError, errors.DNRError)
