"""Parameter pytrees on disk: one msgpack file, written atomically (the bundle's)."""

from __future__ import annotations

import os
from typing import Any

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
