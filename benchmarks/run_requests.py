"""A trained run's own lists file as the requests of the serving benchmarks."""

import json

import numpy as np


def post_path(lists_per_request: int) -> str:
  """Where the bodies of ``request_bodies(..., lists_per_request)`` are posted."""
  return "/rerank" if lists_per_request == 1 else "/rerank_lists"


def request_bodies(bundle, lists_per_request: int = 1):
  """The lists of ``bundle``'s training file as request bodies, and as arrays.

  Returns:
    ``(bodies, arrays)``: ``bodies`` JSON bytes, one list per body for ``POST
    /rerank`` or, with ``lists_per_request`` k > 1, ``{"lists": [k lists]}`` for
    ``POST /rerank_lists`` (the lists left over past a multiple of k are dropped);
    ``arrays`` every list as the batch arrays ``experiments.rerank`` scores.
  """
  from dnr_jax.data import own_lists  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving import rerank_files  # pylint: disable=g-import-not-at-top
  from dnr_jax.serving.online import replay  # pylint: disable=g-import-not-at-top
  config = rerank_files.data_config(bundle, lists=bundle.data_config["lists"],
                                    interactions=bundle.data_config.get("interactions"))
  vocab = bundle.vocabulary()
  history = (own_lists.InteractionHistory.load(config.interactions, vocab, config)
             if config.interactions else None)
  bodies, chunks = [], []
  for chunk in own_lists.read_lists(config.lists, vocab=vocab, config=config,
                                    history=history):
    bodies += replay.request_bodies(chunk, vocab, config.score_transform)
    chunks.append(chunk.arrays)
  arrays = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  k = lists_per_request
  if k > len(bodies):
    raise ValueError(f"lists_per_request={k}: the run's lists file has only "
                     f"{len(bodies)} lists")
  if k > 1:
    bodies = [{"lists": bodies[i:i + k]} for i in range(0, len(bodies) - k + 1, k)]
  return [json.dumps(b).encode() for b in bodies], arrays
