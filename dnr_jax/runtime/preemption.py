"""Stop requests: SIGTERM / SIGINT end a run cleanly instead of killing it mid-step.

Batch schedulers preempt with SIGTERM (then SIGKILL after a grace period); a user
presses Ctrl-C. ``StopRequests`` turns either into a flag that the training loop
checks between steps: the loop finishes the step in flight, saves a checkpoint,
logs it and raises ``errors.Interrupted``. The previous handlers come back when the
``with`` block ends. A second signal of the same kind while the first is being
handled falls through to the previous handler (Ctrl-C twice still interrupts).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
  """Context manager; ``requested`` is the name of the first signal received, or None.

  Outside the main thread (where Python cannot install handlers) it installs
  nothing and never requests a stop.
  """

  def __init__(self, signals=SIGNALS, *,
               then: str = "finishing the current step, then saving a checkpoint"):
    self._signals = tuple(signals)
    self._then = then   # what the holder does on a stop request, for the log line
    self._previous: dict = {}
    self.requested: Optional[str] = None

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested is not None:
      previous = self._previous.get(signum)
      if callable(previous):
        previous(signum, frame)
        return
      if previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
      return
    self.requested = name
    logging.warning("%s received: %s", name, self._then)

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
