"""Loads and calls an exported reranker with jax, numpy and json alone.

``serving.export_reranker`` writes a directory with ``reranker.jax`` (a serialized
``jax.export`` artifact, the parameters baked in, batch dimension symbolic),
``signature.json`` (inputs in call order: name, dtype, shape with ``"b"`` for the
batch, meaning) and, for own-lists runs, ``vocabulary/``. This module imports neither
Flax nor the project's models: a serving process can copy it, or use the plain
``jax.export.deserialize`` it wraps::

  import json, jax, numpy as np
  exp = jax.export.deserialize(bytearray(open(f"{d}/reranker.jax", "rb").read()))
  sig = json.load(open(f"{d}/signature.json"))
  logits = exp.call(*[np.asarray(arrays[i["name"]], i["dtype"]) for i in sig["inputs"]])
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np


@dataclasses.dataclass
class ExportedReranker:
  """A deserialized reranker: call it with a dict of input arrays.

  Attributes:
    exported: the ``jax.export.Exported``.
    signature: the parsed ``signature.json``.
    vocabulary_dir: the raw-id vocabulary folder, or ``None``.
  """
  exported: Any
  signature: dict
  vocabulary_dir: Optional[str] = None

  @property
  def input_names(self) -> list[str]:
    return [i["name"] for i in self.signature["inputs"]]

  def __call__(self, arrays: Mapping[str, Any]) -> np.ndarray:
    """Logits ``[b, n]`` for a batch of ``b`` lists (any ``b`` >= 1).

    ``user_features`` / ``item_features`` may be left out when the model has none
    (zero columns); every other input of ``signature.json`` is required.
    """
    b = int(np.shape(arrays["items"])[0])
    args = []
    for spec in self.signature["inputs"]:
      name = spec["name"]
      shape = tuple(b if d == "b" else d for d in spec["shape"])
      value = arrays.get(name)
      if value is None and name in ("user_features", "item_features") and 0 in shape:
        value = np.zeros(shape, spec["dtype"])
      if value is None:
        raise KeyError(f"exported reranker: input {name!r} missing (inputs: "
                       f"{self.input_names})")
      value = np.asarray(value, spec["dtype"])
      if value.shape != shape:
        raise ValueError(f"exported reranker: input {name!r} has shape {value.shape}, "
                         f"expected {shape}")
      args.append(value)
    return np.asarray(self.exported.call(*args))


def load_exported(directory: str) -> ExportedReranker:
  """Deserializes the reranker that ``serving.export_reranker`` wrote to ``directory``."""
  with open(os.path.join(directory, "signature.json")) as f:
    signature = json.load(f)
  with open(os.path.join(directory, signature["file"]), "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  vocab = signature.get("vocabulary")
  return ExportedReranker(exp, signature,
                          os.path.join(directory, vocab) if vocab else None)
