"""A service's process tree, from /proc: its CPU time, pausing it, ending it."""

import os
import signal
import subprocess


def tree(pid: int) -> list[int]:
  """``pid`` and its descendants, as /proc lists them now."""
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    out.append(p)
    try:
      with open(f"/proc/{p}/task/{p}/children") as f:
        todo += [int(c) for c in f.read().split()]
    except OSError:
      pass
  return out


def cpu_seconds(pids) -> float:
  """User plus system CPU seconds of ``pids`` so far (those gone count 0)."""
  total = 0.0
  for p in pids:
    try:
      with open(f"/proc/{p}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
      pass
  return total


def signal_all(pids, sig) -> None:
  """``sig`` to each of ``pids`` (those gone skipped): SIGSTOP / SIGCONT a tree."""
  for pid in pids:
    try:
      os.kill(pid, sig)
    except ProcessLookupError:
      pass


def end_sessions(procs) -> None:
  """Ends services started with ``start_new_session=True``: each tree resumed, its
  session sent SIGTERM, then SIGKILL after 60 s."""
  procs = list(procs)
  for proc in procs:
    signal_all(tree(proc.pid), signal.SIGCONT)
    try:
      os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:   # it exited already (a service that did not start)
      pass
  for proc in procs:
    try:
      proc.wait(60)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
