"""Prepared data stays true to its sources, and killed preparations leave nothing.

Two guarantees of the caches under ``$DNR_DATA_DIR`` (the raw TFDS data sets and the
``dnr_lists`` list sets):

* **Changed sources are prepared again.** Each prepared data set records the size and
  modification time of every source file it was read from (``fingerprint``); a later
  run compares them with the files now in ``source_dir`` and, when one differs, logs
  which file changed and how, deletes the stale data set and prepares it again,
  instead of "reusing the cached lists". Size and mtime, not a checksum: hashing
  KuaiRand-27K's 23 GB on every run would cost minutes, and a file edited in place,
  truncated, replaced or re-downloaded changes its mtime. (Copying the files without
  keeping their mtimes re-prepares once: a false alarm costs time, never a wrong
  result.) A source file that is *gone* is not a change: people delete the raw files
  after preparing them, and the prepared copy is what was validated.
* **Killed preparations are cleaned up.** TFDS writes a data set into an
  ``incomplete.*`` folder renamed only at the end, and list preparation spills to
  ``incomplete.spill``; a process killed by SIGKILL (or a lost node) leaves them
  behind. Every preparation runs under an exclusive lock (``preparing``: ``flock`` on
  a file in the data set's folder), so whoever holds the lock knows that any
  ``incomplete.*`` folder there belongs to a preparation that is no longer running,
  and deletes it. The lock also makes two runs that want the same data set at once
  prepare it one after the other instead of writing over each other; the second then
  finds it prepared. Readers hold the same lock *shared* while they read (``reading``:
  lists while they are loaded, a raw data set while lists are built from it, which
  can take hours), so a data set whose sources changed is never deleted under a job
  still reading it, and readers never wait for each other. (A TFDS preparation
  started outside ``raw.prepare`` / ``prepare_lists`` does not take the lock;
  nothing in this project does that.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from typing import Iterator, Mapping, Sequence

from absl import logging

LOCK_FILE = ".dnr_prepare.lock"
INCOMPLETE_PREFIX = "incomplete."


def fingerprint(paths: Mapping[str, str]) -> dict[str, list[int]]:
  """``{name: [size in bytes, modification time in ns]}`` of the files ``paths``."""
  out = {}
  for name, path in sorted(paths.items()):
    st = os.stat(path)
    out[name] = [int(st.st_size), int(st.st_mtime_ns)]
  return out


def _when(ns: int) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9))


def changes(recorded: Mapping[str, Sequence[int]] | None,
            current: Mapping[str, Sequence[int]]) -> list[str]:
  """What differs between a recorded and the current ``fingerprint``, one phrase per
  file (empty: nothing changed).

  ``recorded=None`` (a data set without a record of its sources) counts as a change:
  nothing says the sources are the ones it was made from. Files that are no
  longer there are not changes (see the module doc).
  """
  if recorded is None:
    return ["no record of the source files it was prepared from"]
  out = []
  for name, now in sorted(current.items()):
    before = recorded.get(name)
    if before is None:
      continue
    (size0, mtime0), (size1, mtime1) = before, now
    if size0 != size1:
      out.append(f"{name}: {size0} -> {size1} bytes")
    elif mtime0 != mtime1:
      out.append(f"{name}: modified {_when(mtime1)} (was {_when(mtime0)})")
  return out


def stale_leftovers(folder: str) -> list[str]:
  """The ``incomplete.*`` entries of ``folder`` (call only while holding its lock)."""
  if not os.path.isdir(folder):
    return []
  return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                if n.startswith(INCOMPLETE_PREFIX))


def remove_old(folder: str, prefix: str, max_age_s: float = 86400) -> list[str]:
  """Deletes the ``prefix*`` folders in ``folder`` not written to for ``max_age_s``.

  For temporary folders no lock guards, such as half-generated samples
  (``manual/incomplete.*``). A day
  after its last write none is still in use (a whole KuaiRand-27K preparation takes
  hours at most).
  """
  if not os.path.isdir(folder):
    return []
  now, gone = time.time(), []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith(prefix) and os.path.isdir(path) and \
        now - os.path.getmtime(path) > max_age_s:
      logging.warning("deleting %s, left by a killed preparation", path)
      shutil.rmtree(path, ignore_errors=True)
      gone.append(path)
  return gone


# Folders whose lock this process holds -> whether it holds it shared. flock locks
# belong to an open file, so a second lock of the same folder in this process would
# wait for itself; it re-enters instead (preparation is single-threaded).
_HELD: dict[str, bool] = {}


@contextlib.contextmanager
def _locked(folder: str, what: str, shared: bool) -> Iterator[bool]:
  """Holds ``folder``'s lock; yields whether this call took it (not a re-entry)."""
  key = os.path.realpath(folder)
  if key in _HELD:
    if _HELD[key] and not shared:
      raise RuntimeError(f"{what}: cannot prepare while this process reads it")
    yield False
    return
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, LOCK_FILE), "a+") as lock:
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
      fcntl.flock(lock, mode | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("%s: another process is %s; waiting for it to finish", what,
                   "preparing it" if shared else "preparing or reading it")
      fcntl.flock(lock, mode)
    _HELD[key] = shared
    try:
      yield True
    finally:
      _HELD.pop(key, None)
      fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def preparing(folder: str, what: str) -> Iterator[None]:
  """Holds the exclusive lock of ``folder`` (a data set's config folder): to prepare,
  or to delete a data set whose sources changed.

  On entry, once the lock is held, deletes the ``incomplete.*`` leftovers of killed
  preparations in ``folder``. Waits (and says so) while another process prepares or
  reads the data set (``reading``).
  """
  with _locked(folder, what, shared=False) as took:
    if took:
      for path in stale_leftovers(folder):
        logging.warning("%s: deleting %s, left by a preparation that was killed",
                        what, path)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)
    yield


@contextlib.contextmanager
def reading(folder: str, what: str) -> Iterator[None]:
  """Holds the shared lock of ``folder``: while held, no process prepares or deletes
  the data set (they wait), and any number of processes read it at once."""
  with _locked(folder, what, shared=True):
    yield
