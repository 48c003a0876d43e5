"""A fake ``git`` on the PATH, for the tests of what fetches Triton's sources."""

import os
import stat


def fake_git(tmp_path, monkeypatch, exit_code):
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
