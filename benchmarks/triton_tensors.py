"""Tensors in and out of a Triton Python-backend model by DLPack, under NumPy 2.

Written into a model's version folder beside its ``model.py`` (which imports it) by
``benchmarks.triton_server``. The Python-backend stub of the nvidia-pytriton 0.6.0
wheel builds numpy arrays with the NumPy 1 ABI: under NumPy 2 (which JAX needs),
``Tensor.as_numpy`` gives arrays with a stride of 0 (the bytes ``hello`` read as
``hhhhh``), and ``Tensor(name, array)`` misreads the array. DLPack hands the buffer
over without the stub's numpy code.
"""

import sys

import numpy as np


class _Producer:
  """A Triton tensor as a DLPack producer for ``np.from_dlpack``."""

  def __init__(self, tensor):
    self.tensor = tensor

  def __dlpack__(self, stream=None, **kwargs):
    del stream, kwargs
    return self.tensor.to_dlpack()

  def __dlpack_device__(self):
    return (1, 0)   # kDLCPU


def array(tensor) -> np.ndarray:
  """The numpy array of a ``pb_utils.Tensor`` (a view of Triton's buffer)."""
  return np.from_dlpack(_Producer(tensor))


def tensor(pb_utils, name: str, value: np.ndarray):
  """A ``pb_utils.Tensor`` named ``name`` holding ``value`` (copied: DLPack cannot
  hand over a read-only array)."""
  return pb_utils.Tensor.from_dlpack(name, np.array(value, copy=True).__dlpack__())


def _quiet_capsules(unraisable):
  # The stub renames a capsule it consumed in a way NumPy 2 does not expect, and
  # NumPy's destructor raises when the capsule is freed. Anything else goes to
  # Python's default hook.
  if not (isinstance(unraisable.exc_value, ValueError)
          and "PyCapsule_GetPointer" in str(unraisable.exc_value)):
    sys.__unraisablehook__(unraisable)


def install() -> None:
  """Drops the error NumPy raises on freeing each reply's capsule, which would
  otherwise print a traceback per reply."""
  sys.unraisablehook = _quiet_capsules
