"""Loads and calls an exported reranker with jax, numpy and json alone.

``serving.export_reranker`` writes a directory with ``reranker.jax`` (a serialized
``jax.export`` artifact, the parameters baked in, batch dimension symbolic),
``signature.json`` (inputs in call order: name, dtype, shape with ``"b"`` for the
batch, padding side, meaning; the model config with the vocabulary sizes) and, for
own-lists runs, ``vocabulary/``. This module imports neither Flax nor the project's
models: a serving process can copy it, or use the plain ``jax.export.deserialize`` it
wraps::

  import json, jax, numpy as np
  exp = jax.export.deserialize(bytearray(open(f"{d}/reranker.jax", "rb").read()))
  sig = json.load(open(f"{d}/signature.json"))
  logits = exp.call(*[np.asarray(arrays[i["name"]], i["dtype"]) for i in sig["inputs"]])

The artifact itself checks nothing, and a wrong input is silent there: an id past
the vocabulary gives NaN logits, a float id is truncated, a NaN score makes its
list's logits NaN, a history padded on the wrong side gives finite, wrong scores.
``ExportedReranker`` (what ``load_exported`` returns) checks every input first, with
numpy on the host (a few vectorised passes over arrays of ``[b, n]``, cheap against
the call), and rejects a bad one with ONE line naming the input, the position and the
problem (``errors.DataError``, a ``ValueError``). ``exported.call`` stays raw.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from dnr_jax import errors

# The id inputs and the model-config field of their vocabulary size (ids run
# 0 .. size - 1; 0 = padding / unknown). Feature inputs have one size per column.
ID_VOCABULARIES = {"user": "num_users", "history": "num_items", "items": "num_items",
                   "user_features": "user_feature_vocab",
                   "item_features": "item_feature_vocab"}
# The id inputs whose padding is given by a mask, and that mask.
MASKS = {"history": "history_mask", "items": "mask"}
# The padding side of the masks when an older signature does not say it.
DEFAULT_PADDING = {"history_mask": "first", "mask": "last"}
SCORE_INPUTS = ("scores",)


def _first(bad: np.ndarray) -> Optional[tuple]:
  """The index of the first True of ``bad`` (by list, then position), or None."""
  if not bad.any():
    return None
  return tuple(int(i) for i in np.argwhere(bad)[0])


def _error(name: str, index: tuple, problem: str) -> errors.DataError:
  where = ", ".join(map(str, index))
  return errors.DataError(f"exported reranker: input {name!r} at [{where}]: {problem}")


def _typed(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
  """``value`` as an array of ``dtype``'s kind, after checking that it is one.

  Integer inputs stay in a wide integer type (so that an id past int32 is caught as
  too large, not wrapped); ids given as floats must be whole numbers.
  """
  raw = np.asarray(value)
  kind = raw.dtype.kind
  if dtype.kind in "iu":
    if kind in "iub":
      return raw.astype(np.int64) if kind == "b" else raw
    if kind == "f":
      i = _first(~np.isfinite(raw) | (raw != np.round(raw)))
      if i is not None:
        raise _error(name, i, f"{raw[i]} is not an integer id (ids are integers; "
                              "map raw ids through vocabulary/)")
      return raw.astype(np.int64)
    raise errors.DataError(f"exported reranker: input {name!r} has dtype {raw.dtype}, "
                           f"expected {dtype.name} ids (map raw ids through "
                           "vocabulary/ first)")
  if dtype.kind == "b":
    if kind == "b":
      return raw
    if kind in "iuf":
      i = _first((raw != 0) & (raw != 1))
      if i is not None:
        raise _error(name, i, f"{raw[i]} is not a mask value (True / False, or "
                              "1 / 0)")
      return raw.astype(bool)
    raise errors.DataError(f"exported reranker: input {name!r} has dtype {raw.dtype}, "
                           "expected a bool mask")
  if kind not in "iufb":
    raise errors.DataError(f"exported reranker: input {name!r} has dtype {raw.dtype}, "
                           f"expected {dtype.name} numbers")
  return raw.astype(dtype)


def _check_ids(name: str, v: np.ndarray, field: str, size) -> None:
  """Ids in ``0 .. size - 1`` (``size`` per feature column for feature inputs)."""
  i = _first(v < 0)
  if i is not None:
    raise _error(name, i, f"negative id {int(v[i])} (ids are >= 0; 0 = padding / "
                          "unknown)")
  size = np.asarray(size, np.int64)
  i = _first(v >= size)
  if i is not None:
    limit = int(size[i[-1]]) if size.ndim else int(size)
    what = f"{field}[{i[-1]}]" if size.ndim else field
    raise _error(name, i, f"id {int(v[i])} is past the vocabulary ({what} = {limit}: "
                          f"ids 0 .. {limit - 1}; unknown raw ids map to 0)")


def _check_scores(name: str, v: np.ndarray) -> None:
  i = _first(~np.isfinite(v))
  if i is not None:
    raise _error(name, i, f"score {v[i]} is not finite (scores are in [0, 1])")
  i = _first((v < 0) | (v > 1))
  if i is not None:
    raise _error(name, i, f"score {v[i]:g} is outside [0, 1] (0 for padding)")


def _check_padding(ids: str, v: np.ndarray, mask_name: str, mask: np.ndarray,
                   side: str) -> None:
  """The mask on its side (``"first"``: right-aligned; ``"last"``: real entries
  first), and id 0 wherever it says padding."""
  wrong = np.zeros_like(mask)
  if side == "first":
    wrong[..., 1:] = mask[..., :-1] & ~mask[..., 1:]
    problem = ("padding after a real item: the history is padded FIRST "
               "(right-aligned, most recent item last)")
  else:
    wrong[..., 1:] = ~mask[..., :-1] & mask[..., 1:]
    problem = ("a real candidate after padding: candidates are padded LAST (real "
               "ones first, in upstream order)")
  i = _first(wrong)
  if i is not None:
    raise _error(mask_name, i, problem)
  i = _first(~mask & (v != 0))
  if i is not None:
    raise _error(ids, i, f"id {int(v[i])} where {mask_name!r} says padding (padding "
                         "ids must be 0)")


def check_inputs(signature: dict, arrays: Mapping[str, Any]) -> list[np.ndarray]:
  """The inputs of ``arrays`` in call order and in the signature's dtypes, checked.

  Checks, each failing with one line (``errors.DataError``) that names the input,
  the first bad position and the problem: the dtype and shape; ids that are not
  whole numbers, negative, or past the vocabulary (``signature["config"]["model"]``);
  scores that are not finite or outside [0, 1]; masks on the wrong side (the history
  is padded FIRST, right-aligned; candidates LAST: ``signature.json``'s
  ``"padding"``); a non-zero id where its mask says padding. A missing input is a
  ``KeyError``; ``user_features`` / ``item_features`` may be left out when the model
  has none.
  """
  inputs = signature["inputs"]
  names = [i["name"] for i in inputs]
  if "items" not in arrays:
    raise KeyError(f"exported reranker: input 'items' missing (inputs: {names})")
  b = int(np.shape(arrays["items"])[0])
  values: dict[str, np.ndarray] = {}
  for spec in inputs:
    name, dtype = spec["name"], np.dtype(spec["dtype"])
    shape = tuple(b if d == "b" else d for d in spec["shape"])
    value = arrays.get(name)
    if value is None and name in ("user_features", "item_features") and 0 in shape:
      value = np.zeros(shape, dtype)
    if value is None:
      raise KeyError(f"exported reranker: input {name!r} missing (inputs: {names})")
    if np.shape(value) != shape:
      raise errors.DataError(f"exported reranker: input {name!r} has shape "
                             f"{np.shape(value)}, expected {shape} (b = {b} lists)")
    values[name] = _typed(name, value, dtype)
  model = signature.get("config", {}).get("model", {})
  for name, field in ID_VOCABULARIES.items():
    if name in values and field in model:
      _check_ids(name, values[name], field, model[field])
  for name in SCORE_INPUTS:
    if name in values:
      _check_scores(name, values[name])
  padding = {s["name"]: s.get("padding") for s in inputs}
  for ids, mask_name in MASKS.items():
    if ids in values and mask_name in values:
      _check_padding(ids, values[ids], mask_name, values[mask_name],
                     padding.get(mask_name) or DEFAULT_PADDING[mask_name])
  return [values[n].astype(np.dtype(s["dtype"]), copy=False)
          for n, s in zip(names, inputs)]


@dataclasses.dataclass
class ExportedReranker:
  """A deserialized reranker: call it with a dict of input arrays.

  Attributes:
    exported: the ``jax.export.Exported`` (its ``call`` checks nothing).
    signature: the parsed ``signature.json``.
    vocabulary_dir: the raw-id vocabulary folder, or ``None``.
  """
  exported: Any
  signature: dict
  vocabulary_dir: Optional[str] = None

  @property
  def input_names(self) -> list[str]:
    return [i["name"] for i in self.signature["inputs"]]

  def check(self, arrays: Mapping[str, Any]) -> list[np.ndarray]:
    """The call's arguments, checked (``check_inputs``)."""
    return check_inputs(self.signature, arrays)

  def __call__(self, arrays: Mapping[str, Any]) -> np.ndarray:
    """Logits ``[b, n]`` for a batch of ``b`` lists (any ``b`` >= 1), inputs checked.

    ``user_features`` / ``item_features`` may be left out when the model has none
    (zero columns); every other input of ``signature.json`` is required.

    Raises:
      errors.DataError: a bad input (one line: input, position, problem).
      KeyError: a missing input.
    """
    return np.asarray(self.exported.call(*self.check(arrays)))


def load_exported(directory: str) -> ExportedReranker:
  """Deserializes the reranker that ``serving.export_reranker`` wrote to ``directory``."""
  with open(os.path.join(directory, "signature.json")) as f:
    signature = json.load(f)
  with open(os.path.join(directory, signature["file"]), "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  vocab = signature.get("vocabulary")
  return ExportedReranker(exp, signature,
                          os.path.join(directory, vocab) if vocab else None)
