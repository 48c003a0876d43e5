"""Parameter pytrees on disk: one msgpack file, written atomically.

The training loop keeps the reranker parameters of its *selected* epoch (the best
validation NDCG@K so far, see ``train``) in ``<workdir>/best_params/``, one file per
candidate epoch, because the orbax checkpoint of that epoch may be deleted by
``keep_checkpoints`` long before training ends. ``BestParams`` owns that folder:
which files to write, which a resumed run can trust, and which to delete.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Optional

import flax.serialization
import jax
import numpy as np

from dnr_jax import errors


def save(path: str, params: Any) -> None:
  """Writes a host copy of ``params`` to ``path`` (temporary file, then rename)."""
  data = flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, jax.device_get(params)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load(path: str) -> Any:
  """The nested dict of numpy arrays that ``save`` wrote."""
  try:
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  except FileNotFoundError as e:
    raise errors.CheckpointError(f"{path}: parameter file not found") from e
  except Exception as e:  # msgpack raises several unrelated types on damage
    raise errors.CheckpointError(f"{path}: damaged parameter file ({e})") from e


def _value(record: dict, metric: str) -> float:
  value = record["valid"].get(metric)
  return value if value is not None and np.isfinite(value) else -np.inf


_NAME = re.compile(r"^epoch(\d+)\.msgpack$")


class BestParams:
  """The selected epoch's reranker parameters, kept across restarts.

  The loop calls ``offer`` after every epoch (it writes the parameters when the epoch
  is a new best) and ``checkpointed`` after every orbax save (it deletes files no
  restorable checkpoint can select any more). ``resume`` picks the file of the best
  epoch of a restored history. Files of epochs newer than the restored checkpoint are
  dropped: those epochs are trained again.

  Attributes:
    epoch: the 1-based epoch of ``params`` (0: none yet).
    params: host copy of the best reranker parameters so far (``None``: none yet).
  """

  def __init__(self, directory: Optional[str], select_metric: str, keep: int = 2,
               writer: bool = True):
    self.directory = directory
    # With several processes sharing a workdir, one writes and deletes; all read.
    self.writer = writer
    self.metric = select_metric
    self.epoch = 0
    self.params = None
    self._value = -np.inf
    # The best epoch as of each orbax save still kept (``keep``), plus the one being
    # written (saves are asynchronous): a damaged latest checkpoint falls back to an
    # older one (``checkpoints``), whose selected epoch must still have its file.
    self._keep = max(int(keep), 1) + 1
    self._kept: list[int] = []

  def _path(self, epoch: int) -> str:
    return os.path.join(self.directory, f"epoch{epoch:05d}.msgpack")

  def _files(self) -> dict[int, str]:
    if not self.directory or not os.path.isdir(self.directory):
      return {}
    out = {}
    for name in os.listdir(self.directory):
      m = _NAME.match(name)
      if m:
        out[int(m.group(1))] = os.path.join(self.directory, name)
    return out

  def offer(self, record: dict, params_fn) -> None:
    """Keeps ``params_fn()`` if ``record`` (an epoch of the history) is a new best.

    Strictly better only, as ``max`` over the history picks the first best epoch
    (a missing or non-finite value counts as ``-inf``, as in ``train``; the first
    epoch is kept in any case). ``params_fn`` is called only then (it copies the
    parameters to the host).
    """
    value = _value(record, self.metric)
    if value > self._value or not self.epoch:
      self._value, self.epoch = value, record["epoch"]
      self.params = jax.device_get(params_fn())
      if self.directory and self.writer:
        save(self._path(self.epoch), self.params)

  def checkpointed(self) -> None:
    """After an orbax save: deletes files no checkpoint still kept may select."""
    self._kept = (self._kept + [self.epoch])[-self._keep:]
    for epoch, path in self._files().items():
      if epoch not in self._kept and self.writer:
        os.remove(path)

  def resume(self, history: list[dict],
             restored_params_fn: Optional[Callable[[], Any]]) -> None:
    """Picks up the best epoch of a restored ``history``.

    Args:
      history: the records up to the restored checkpoint.
      restored_params_fn: the restored state's reranker parameters when they are
        those of the history's last epoch (``None`` for a mid-epoch checkpoint),
        used when that epoch is the best and its file was not written yet.

    Raises:
      CheckpointError: the best epoch's parameters are nowhere to be found.
    """
    if not history:
      return
    files = self._files()
    last = history[-1]["epoch"]
    for epoch, path in files.items():
      if epoch > last and self.writer:
        os.remove(path)     # trained again after the resume
    best = max(history, key=lambda r: _value(r, self.metric))
    self._value, self.epoch = _value(best, self.metric), best["epoch"]
    if self.epoch in files:
      self.params = load(files[self.epoch])
    elif self.epoch == last and restored_params_fn is not None:
      self.params = jax.device_get(restored_params_fn())
      if self.directory and self.writer:
        save(self._path(self.epoch), self.params)
    else:
      raise errors.CheckpointError(
          f"{self.directory}: no parameters of the selected epoch {self.epoch} "
          f"(valid {self.metric}={self._value:.4f}); the run cannot report its "
          "selected reranker")
    self._kept = [self.epoch]
