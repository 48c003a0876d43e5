"""PIER as a DNR backbone: OCPM's scorer, and FPSM's permutation search.

PIER (Shi et al., "PIER: Permutation-Level Interest-Based End-to-End Re-ranking
Framework in E-commerce", KDD 2023, arXiv 2302.03487) has two modules:

* **FPSM** (fine-grained permutation selection) generates many candidate
  permutations of the ranked list, signs each one and each of the user's past
  (clicked) permutations with SimHash, and keeps the top-k candidates closest to the
  user's history in Hamming distance: a cheap, personalised pre-selection.
* **OCPM** (omnidirectional context-aware prediction) scores a permutation: every item
  is predicted in its position, with the context of the items before *and* after it
  (the "omnidirectional" attention, position-aware), and with the user's
  *permutation-level* interest (attention of the permutation to the user's past
  permutations). The permutation's value is the sum of its items' predictions.

As a DNR backbone what matters is the scorer, so ``PIER`` below is OCPM behind the
same interface as PRM, SetRank and DLCM (``models.make_reranker``): ``[B, n]`` logits
for the candidates of each list *in the order they are stored* (the retriever's
order), padding id 0, the ``score_usage`` variants through ``InputTokens``,
differentiable in the scores (L_adv trains the generator through it). FPSM is
``fpsm_search``, an option for reranking at inference time: with
``ModelConfig.fpsm_permutations > 0`` evaluation ranks each list by the permutation
it picks (``fpsm_ranking``, the backbone's ranking hook) instead of sorting the
logits, so a table row such as ``c_score+model.fpsm_permutations=16`` measures it.

What is kept:

* **Omnidirectional, position-aware attention over the list.** Each candidate attends
  to every valid candidate before and after it; the attention logits get a learned
  per-head bias for every *signed* offset ``i - j`` (so "the item two slots above me"
  and "two slots below" are different contexts, and context decays or not with
  distance as learned), on top of a learned absolute position embedding. Permuting
  the list therefore changes every score: OCPM scores an item *in its context*,
  unlike SetRank (equivariant).
* **Permutation-level interest.** The candidate permutation is embedded as a whole
  (position-aware pooling of its tokens) and attends to the user's past permutations;
  each candidate also attends to them (item-level target attention). Both interest
  vectors join the candidate's context vector in the prediction head.
* **SimHash selection by Hamming distance** (``fpsm_search``), then OCPM scoring of
  the selected permutations, the best one returned.

What is simplified, and why:

* **Past permutations are pseudo-permutations.** PIER's history holds the lists the
  user was shown, in their display order. ``ListBatch.history`` holds only the user's
  previous positive items, most recent last, so the history is cut into consecutive
  windows of ``ModelConfig.pier_window`` items (aligned on the most recent item;
  padding windows masked), each read as one past permutation with its items in their
  window positions, plus a learned recency embedding per window (PIER weights its
  history by time; here the window's age stands in for the time stamp).
* **No fine-grained feature context.** PIER's OCPM also attends across the *features*
  of the items in context (e.g. the neighbours' prices). Our items have an id and a
  few categorical features, which ``InputTokens`` already sums into one token; the
  attention runs over tokens, not per feature field.
* **No end-to-end FPSM training.** PIER trains FPSM with a contrastive loss driven by
  OCPM's values. Inside DNR only the scorer is trained (DNR's losses are per-item BCE,
  Eq. 5), so ``fpsm_search`` uses fixed random SimHash hyperplanes over the trained
  model's item embeddings, as SimHash itself does, and OCPM's scores decide.
* **OCPM reads positions as stored.** DNR trains on lists in the retriever's order,
  so the position embedding learns "retriever rank". When ``fpsm_search`` scores a
  permuted list, the positions are display positions of that permutation, as in
  PIER, but the model was trained only on retriever-ordered lists: its values of
  other permutations extrapolate. This is why the search is an option, not the
  default ranking (which sorts the logits of the list as stored).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax.models import dropout as dropout_lib
from dnr_jax.models import tables
from dnr_jax.models.layers import InputTokens, head, masked_mean, per_set, tile_sets


class OmnidirectionalAttention(nn.Module):
  """Multi-head self-attention over the list with a learned bias per signed offset.

  ``bias[h, i, j] = table[h, i - j]``: each head learns how much context from each
  relative position (before or after, near or far) counts, in both directions at
  once. Padding is masked out of the keys.
  """
  hidden: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    n = x.shape[-2]
    head_dim = self.hidden // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    table = self.param("offset_bias", nn.initializers.zeros, (self.num_heads, 2 * n - 1))
    offset = jnp.arange(n)[:, None] - jnp.arange(n)[None, :] + n - 1
    bias = table[:, offset][None]                               # [1, heads, n, n]
    out = nn.dot_product_attention(q, k, v, bias=bias,
                                   mask=nn.make_attention_mask(mask, mask),
                                   deterministic=True)
    return nn.DenseGeneral(self.hidden, axis=(-2, -1), name="out")(out)


class OmnidirectionalBlock(nn.Module):
  """Pre-LayerNorm block: omnidirectional attention, then a feed-forward layer."""
  hidden: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    h = OmnidirectionalAttention(self.hidden, self.num_heads, name="attention")(
        nn.LayerNorm()(x), mask)
    x = x + dropout_lib.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.hidden)(nn.gelu(nn.Dense(2 * self.hidden)(h)))
    return x + dropout_lib.Dropout(self.dropout, deterministic=not train)(h)


def history_permutations(history: jax.Array, history_mask: jax.Array,
                         window: int) -> tuple[jax.Array, jax.Array]:
  """The history cut into pseudo-permutations of ``window`` items.

  Windows are aligned on the most recent item (the last column), so the newest
  window is always full when the history is; the oldest is left-padded if ``H`` is
  not a multiple of ``window``.

  Returns:
    ``(items [B, P, window], mask [B, P, window])`` with ``P = ceil(H / window)``,
    oldest window first.
  """
  b, h = history.shape
  pad = (-h) % window
  items = jnp.pad(history, ((0, 0), (pad, 0)))
  mask = jnp.pad(history_mask, ((0, 0), (pad, 0)))
  p = (h + pad) // window
  return items.reshape(b, p, window), mask.reshape(b, p, window)


class PIER(nn.Module):
  """OCPM, PIER's permutation scorer, as a DNR reranker (see the module docstring).

  Tokens (``InputTokens``: item, user, scores) plus a learned position embedding go
  through ``num_layers`` omnidirectional blocks (context). The user's past
  pseudo-permutations are embedded (items in window positions, pooled, plus
  recency) and attended to twice: by the whole candidate permutation (pooled
  context; permutation-level interest) and by each candidate (item-level interest).
  The head scores each candidate from ``[context, item interest, permutation
  interest]``.
  """
  config: config_lib.ModelConfig
  table_shards: int = 1   # the item table's row shards (``models.tables``)

  @nn.compact
  def __call__(self, batch: batch_lib.ListBatch, train: bool = False,
               score_sets=None) -> jax.Array:
    c = self.config
    d = c.hidden
    n = batch.items.shape[-1]
    tokens = InputTokens(c, self.table_shards, name="tokens")
    x = tokens(batch, train, score_sets)       # [K * B, n, d] (models: score sets)
    k = x.shape[0] // batch.items.shape[0]
    mask = tile_sets(batch.mask, k)
    x = x + self.param("position", nn.initializers.normal(0.02), (n, d))
    for i in range(c.num_layers):
      x = OmnidirectionalBlock(d, c.num_heads, c.dropout, name=f"omni_{i}")(
          x, mask, train)
    x = nn.LayerNorm(name="context_norm")(x)

    # The user's past (pseudo-)permutations, with the item embeddings of the
    # candidates' tokens: a past permutation and a candidate one live in one space.
    table = tokens.variables["params"]["item_embed"]["embedding"]
    window = c.pier_window
    hist, hmask = history_permutations(batch.history, batch.history_mask, window)
    h = tables.take(table, hist, self.table_shards)
    h = h + self.param("window_position", nn.initializers.normal(0.02), (window, d))
    h = nn.Dense(d, name="past_proj")(masked_mean(h, hmask))             # [B, P, d]
    h = h + self.param("recency", nn.initializers.normal(0.02), (h.shape[-2], d))
    # The past does not depend on the scores: one copy per score set.
    h, hmask = (tile_sets(a, k) for a in (h, hmask))
    past = hmask.any(-1)                                                   # [B, P]
    has_past = past.any(-1)                                                # [B]

    perm = nn.Dense(d, name="permutation_proj")(masked_mean(x, mask))
    attend = lambda name, q, q_mask: nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, name=name)(q, h, mask=nn.make_attention_mask(q_mask, past))
    ones = jnp.ones(perm.shape[:1] + (1,), bool)
    perm_interest = attend("permutation_interest", perm[:, None, :], ones)  # [B, 1, d]
    item_interest = attend("item_interest", x, mask)                       # [B, n, d]
    # A user with no history has no interest to attend to (the softmax over an
    # all-masked row would average padding).
    keep = has_past[:, None, None].astype(x.dtype)
    perm_interest, item_interest = perm_interest * keep, item_interest * keep
    feats = jnp.concatenate(
        [x, item_interest, jnp.broadcast_to(perm_interest, x.shape)], -1)
    feats = dropout_lib.Dropout(c.dropout, deterministic=not train)(feats)
    return per_set(head(feats, d), score_sets)


# --------------------------------------------------------------------------------------
# FPSM: permutation search.


class FPSMResult(NamedTuple):
  """What ``fpsm_search`` found, per list.

  Attributes:
    permutation: ``[B, n]`` int32, the best permutation: position ``j`` shows the
      candidate stored at index ``permutation[j]``; padding stays at the end.
    value: ``[B]`` OCPM's value of ``permutation``.
    candidates: ``[B, P, n]`` every generated permutation (index 0: the list as
      stored, 1: the order of OCPM's logits on it, then Gumbel-perturbed orders).
    similarity: ``[B, P]`` mean SimHash similarity (1 - Hamming / bits) of each
      candidate to the user's past permutations (0 without history).
    selected: ``[B, k]`` indices into ``candidates`` of the top-k by similarity.
    values: ``[B, k]`` OCPM's value of each selected permutation.
  """
  permutation: jax.Array
  value: jax.Array
  candidates: jax.Array
  similarity: jax.Array
  selected: jax.Array
  values: jax.Array


def position_weights(n: int) -> jax.Array:
  """``1 / log2(j + 2)``, the DCG discount: the top of a permutation weighs most."""
  return 1.0 / jnp.log2(jnp.arange(n, dtype=jnp.float32) + 2.0)


def simhash(embeddings: jax.Array, hyperplanes: jax.Array) -> jax.Array:
  """SimHash signatures: the sign bits of random projections, ``[..., bits]`` bool."""
  return embeddings @ hyperplanes > 0


def permute_batch(batch: batch_lib.ListBatch, perm: jax.Array) -> batch_lib.ListBatch:
  """``batch`` with each list's candidates in the order ``perm`` ``[B, n]``."""
  take = lambda x: jnp.take_along_axis(x, perm.reshape(perm.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  return batch.replace(items=take(batch.items), scores=take(batch.scores),
                       labels=take(batch.labels), mask=take(batch.mask),
                       item_features=take(batch.item_features))


def _order(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Indices by decreasing ``values``, padding last; stable (ties keep stored order)."""
  return jnp.argsort(jnp.where(mask, -values, jnp.inf), axis=-1, stable=True)


def permutation_value(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """OCPM's value of permutations: position-weighted sum of predicted probabilities.

  PIER sums its items' predicted click rates; the DCG weights make the items shown
  first count most, as they do in the metrics.
  """
  w = position_weights(logits.shape[-1])
  return (jax.nn.sigmoid(logits) * w * mask).sum(-1)


def fpsm_search(key: jax.Array, batch: batch_lib.ListBatch,
                score_fn: Callable[[batch_lib.ListBatch], jax.Array],
                item_embedding: jax.Array, *, num_permutations: int = 16,
                top_k: int = 4, num_bits: int = 32, window: int = 5,
                temperature: float = 1.0) -> FPSMResult:
  """FPSM's search: generate permutations, keep the top-k by SimHash, score, pick.

  1. Candidates (``num_permutations`` per list): the list as stored (the retriever's
     order), the order of ``score_fn``'s logits on it, and orders of those logits
     plus ``temperature`` x Gumbel noise (a cheap stand-in for PIER's full
     enumeration or beam search over long lists).
  2. A permutation's embedding is the DCG-weighted sum of its items' embeddings
     (``item_embedding[items]``); the user's past permutations (the history in
     windows of ``window`` items, ``history_permutations``) are embedded the same
     way. SimHash signs them with ``num_bits`` random hyperplanes drawn from
     ``key``; a candidate's similarity is the mean over the valid past permutations
     of ``1 - Hamming / num_bits``.
  3. The ``top_k`` most similar candidates are scored by ``score_fn`` on the
     permuted lists (``permutation_value``) and the best is returned.

  Args:
    key: PRNG key (Gumbel noise and hyperplanes); the result is a function of it.
    batch: ``[B, n]`` lists; valid candidates first, padding last.
    score_fn: OCPM, ``ListBatch -> [B, n]`` logits (e.g. a trained ``PIER``).
    item_embedding: ``[num_items, d]`` table for the SimHash embeddings.
    num_permutations: ``P >= 2`` candidates per list.
    top_k: how many candidates OCPM scores, ``1 <= top_k <= P``.
    num_bits: SimHash signature length.
    window: items per past pseudo-permutation.
    temperature: Gumbel noise scale of the random candidates.

  Returns:
    An ``FPSMResult``.
  """
  if num_permutations < 2 or not 1 <= top_k <= num_permutations:
    raise ValueError(f"fpsm_search: need num_permutations >= 2 and 1 <= top_k <= "
                     f"num_permutations, got {num_permutations} and {top_k}")
  b, n = batch.items.shape
  k_gumbel, k_hash = jax.random.split(key)
  logits = score_fn(batch)
  gumbel = jax.random.gumbel(k_gumbel, (b, num_permutations - 2, n))
  noisy = _order(logits[:, None, :] + temperature * gumbel, batch.mask[:, None, :])
  stored = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, 1, n))
  candidates = jnp.concatenate(
      [stored, _order(logits, batch.mask)[:, None, :].astype(jnp.int32),
       noisy.astype(jnp.int32)], axis=1)                                   # [B, P, n]

  w = position_weights(n)
  cand_items = jnp.take_along_axis(batch.items[:, None, :], candidates, axis=-1)
  cand_mask = jnp.take_along_axis(batch.mask[:, None, :], candidates, axis=-1)
  cand_emb = jnp.einsum("bpn,bpnd->bpd", w * cand_mask,
                        jnp.take(item_embedding, cand_items, axis=0))
  hist, hmask = history_permutations(batch.history, batch.history_mask, window)
  past_emb = jnp.einsum("bqw,bqwd->bqd", position_weights(window) * hmask,
                        jnp.take(item_embedding, hist, axis=0))
  planes = jax.random.normal(k_hash, (item_embedding.shape[-1], num_bits))
  sig_c, sig_p = simhash(cand_emb, planes), simhash(past_emb, planes)
  hamming = (sig_c[:, :, None, :] != sig_p[:, None, :, :]).sum(-1)        # [B, P, Q]
  past = hmask.any(-1)[:, None, :]
  sim = jnp.where(past, 1.0 - hamming / num_bits, 0.0).sum(-1) / jnp.maximum(
      past.sum(-1), 1)

  _, selected = jax.lax.top_k(sim, top_k)                                  # [B, k]
  chosen = jnp.take_along_axis(candidates, selected[..., None], axis=1)    # [B, k, n]
  flat = jax.tree.map(lambda x: jnp.repeat(x, top_k, axis=0), batch)
  flat = permute_batch(flat, chosen.reshape(b * top_k, n))
  values = permutation_value(score_fn(flat), flat.mask).reshape(b, top_k)
  best = jnp.argmax(values, axis=-1)
  permutation = jnp.take_along_axis(chosen, best[:, None, None], axis=1)[:, 0]
  return FPSMResult(permutation=permutation,
                    value=jnp.take_along_axis(values, best[:, None], axis=1)[:, 0],
                    candidates=candidates, similarity=sim, selected=selected,
                    values=values)


def fpsm_rerank(key: jax.Array, params, config: config_lib.ModelConfig,
                batch: batch_lib.ListBatch, **kwargs) -> FPSMResult:
  """``fpsm_search`` with a trained PIER reranker (``params``) as OCPM.

  The SimHash embeddings are the model's own item embeddings; keyword arguments go
  to ``fpsm_search`` (``window`` defaults to ``config.pier_window``).
  """
  if config.backbone != "pier":
    raise ValueError(f"fpsm_rerank needs model.backbone='pier', got {config.backbone!r}")
  module = PIER(config)
  score_fn = lambda b: module.apply({"params": params}, b, train=False)
  kwargs.setdefault("window", config.pier_window)
  return fpsm_search(key, batch, score_fn,
                     params["tokens"]["item_embed"]["embedding"], **kwargs)


def permutation_logits(permutation: jax.Array) -> jax.Array:
  """Logits ``[B, n]`` that rank the stored candidates in ``permutation``'s order.

  ``metrics.list_metrics`` ranks by logits; this turns a searched permutation into
  logits it ranks the same way (position 0 highest).
  """
  b, n = permutation.shape
  ranks = jnp.zeros((b, n), jnp.float32).at[jnp.arange(b)[:, None], permutation].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (b, n)))
  return -ranks


def fpsm_ranking(config: config_lib.ModelConfig):
  """``(key, params, batch) -> logits`` ranking each list by FPSM's search.

  The ranking hook of ``models.registry.ranking_fn``: ``config.fpsm_permutations``
  candidate permutations, the ``config.fpsm_top_k`` most similar to the user's past
  ones scored by OCPM, the best one's order as logits (``permutation_logits``).
  """
  def rank(key, params, batch):
    r = fpsm_rerank(key, params, config, batch, num_permutations=config.fpsm_permutations,
                    top_k=config.fpsm_top_k)
    return permutation_logits(r.permutation)
  return rank
