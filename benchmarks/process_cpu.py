"""CPU time of a process tree, from /proc: what a service's processes used."""

import os


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
