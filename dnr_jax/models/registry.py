"""The backbones by name, and the hook a backbone may give for its own ranking."""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax.models import listwise, pier

# ``ModelConfig.backbone`` -> its Flax module (each takes the ``ModelConfig``).
BACKBONES = {"prm": listwise.PRM, "setrank": listwise.SetRank, "dlcm": listwise.DLCM,
             "pier": pier.PIER}

# ``(key, params, batch) -> logits [B, n]`` whose order is the order shown to the
# user, for a backbone that ranks by more than sorting its logits.
RankFn = Callable[[jax.Array, dict, batch_lib.ListBatch], jax.Array]


def make_reranker(config: config_lib.ModelConfig, *, export: bool = False,
                  table_shards: int = 1) -> nn.Module:
  """The reranker module of ``config.backbone``.

  ``export=True`` gives the formulation graph exporters trace (ONNX,
  ``serving/onnx_export.py``): the same parameters and logits, no flax lifted
  transform (DLCM's GRU unrolled, ``DLCM.unroll``). ``table_shards > 1``: the item
  and user tables are row shards over the ``'model'`` mesh axis (``models.tables``;
  only inside the step compiled with that axis).
  """
  if config.backbone not in BACKBONES:
    raise ValueError(f"model.backbone={config.backbone!r} is not one of "
                     f"{sorted(BACKBONES)}")
  if config.score_usage not in config_lib.SCORE_USAGES:
    raise ValueError(f"model.score_usage={config.score_usage!r} is not one of "
                     f"{list(config_lib.SCORE_USAGES)}")
  if export and config.backbone == "dlcm":
    return listwise.DLCM(config, table_shards=table_shards, unroll=True)
  return BACKBONES[config.backbone](config, table_shards=table_shards)


def ranking_fn(config: config_lib.ModelConfig) -> Optional[RankFn]:
  """The backbone's own ranking of a batch, or None to sort the reranker's logits.

  PIER with ``fpsm_permutations`` ranks each list by FPSM's permutation search.
  """
  if config.backbone == "pier" and config.fpsm_permutations:
    return pier.fpsm_ranking(config)
  return None
