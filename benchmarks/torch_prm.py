"""A plain PyTorch eager PRM and DNR step: the reference dnr-jax's step is timed against.

Not part of the library (``pip install -e ".[bench]"`` installs torch). A
straightforward eager implementation of the same model and the same updates as
``dnr_jax.step`` at the same shapes, written as a PyTorch user would write it:

* PRM (``dnr_jax.models.PRM`` with ``score_usage="concat"``): item-id (+ feature)
  embeddings; the user state from a pre-LayerNorm Transformer over the history with
  learned positions, mean-pooled over the valid items, plus user-id (+ feature)
  embeddings, projected and added to every candidate token; the c-score MLP score
  embedding concatenated and projected back; a learned rank-position embedding;
  ``num_layers`` pre-LayerNorm Transformer blocks over the list; an MLP head. Tanh
  GELU, dropout where dnr-jax has it, padded keys masked out of attention.
* the model generator (``dnr_jax.noise.ScoreGenerator``): its own item and user
  embeddings, ``[user, z, item, N(0, 1) draw]`` through a 2-layer MLP and a sigmoid.
* the step: theta with ``L_direct + lambda_m L_z`` (the generated scores ``x'`` from
  the frozen generator, or Eq. 4 noise in the heuristic phase), AdamW with global-norm
  clipping; then, in the ``model`` phase, phi with ``lambda_adv L_adv + lambda_x L_x``
  (per-class 1-D Wasserstein by 64 quantiles) against the UPDATED theta, the reranker
  in eval mode (no dropout) and its parameters frozen. Each reranker call is a full
  forward pass (the history encoder included), as in the straightforward formulation.

Numerics are not compared with dnr-jax (different initialisation and random
streams); only the work per step is the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
  """Pre-LayerNorm Transformer encoder block (as ``dnr_jax.models.EncoderBlock``)."""

  def __init__(self, d: int, heads: int, dropout: float):
    super().__init__()
    self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
    self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
    self.drop = nn.Dropout(dropout)

  def forward(self, x, pad):   # pad: True where padding
    h = self.ln1(x)
    h, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
    x = x + self.drop(h)
    h = self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))
    return x + self.drop(h)


class PRM(nn.Module):
  """The PRM reranker with c score, same layout as ``dnr_jax.models.PRM``."""

  def __init__(self, c, list_size: int, history_size: int):
    super().__init__()
    if c.score_usage != "concat" or c.backbone != "prm":
      raise ValueError("the PyTorch reference implements PRM with c score only")
    d = c.hidden
    self.item_embed = nn.Embedding(c.num_items, d)
    self.item_features = nn.ModuleList(nn.Embedding(v, d) for v in c.item_feature_vocab)
    self.user_embed = nn.Embedding(c.num_users, d)
    self.user_features = nn.ModuleList(nn.Embedding(v, d) for v in c.user_feature_vocab)
    self.history_position = nn.Parameter(0.02 * torch.randn(history_size, d))
    self.history = nn.ModuleList(Block(d, c.num_heads, c.dropout)
                                 for _ in range(c.history_layers))
    self.user_proj = nn.Linear(d, d)
    self.score_in, self.score_out = nn.Linear(1, d), nn.Linear(d, d)
    self.score_concat = nn.Linear(2 * d, d)
    self.drop = nn.Dropout(c.dropout)
    self.rank_position = nn.Parameter(0.02 * torch.randn(list_size, d))
    self.blocks = nn.ModuleList(Block(d, c.num_heads, c.dropout)
                                for _ in range(c.num_layers))
    self.ln = nn.LayerNorm(d)
    self.head_in, self.head_out = nn.Linear(d, d), nn.Linear(d, 1)

  def forward(self, b: dict, scores: torch.Tensor) -> torch.Tensor:
    item = self.item_embed(b["items"])
    for j, emb in enumerate(self.item_features):
      item = item + emb(b["item_features"][..., j])
    hist = self.item_embed(b["history"]) + self.history_position
    hpad = ~b["history_mask"]
    for blk in self.history:
      hist = blk(hist, hpad)
    w = b["history_mask"].unsqueeze(-1).float()
    user = (hist * w).sum(1) / w.sum(1).clamp_min(1.0) + self.user_embed(b["user"])
    for j, emb in enumerate(self.user_features):
      user = user + emb(b["user_features"][..., j])
    tokens = item + self.user_proj(user).unsqueeze(1)
    s = self.score_out(F.gelu(self.score_in(scores.unsqueeze(-1)), approximate="tanh"))
    x = self.drop(self.score_concat(torch.cat([tokens, s], -1))) + self.rank_position
    pad = ~b["mask"]
    for blk in self.blocks:
      x = blk(x, pad)
    return self.head_out(F.gelu(self.head_in(self.ln(x)), approximate="tanh"))[..., 0]


class Generator(nn.Module):
  """The model generator ``f_phi(u, z)`` (``dnr_jax.noise.ScoreGenerator``)."""

  def __init__(self, noise, c):
    super().__init__()
    h = noise.generator_hidden
    self.noise_dim = noise.generator_noise_dim
    self.item_embed = nn.Embedding(c.num_items, h)
    self.user_embed = nn.Embedding(c.num_users, h)
    self.hidden = nn.Linear(2 * h + 1 + self.noise_dim, h)
    self.out = nn.Linear(h, 1)

  def forward(self, b: dict) -> torch.Tensor:
    w = b["history_mask"].unsqueeze(-1).float()
    user = ((self.item_embed(b["history"]) * w).sum(1) / w.sum(1).clamp_min(1.0)
            + self.user_embed(b["user"]))
    bsz, n = b["items"].shape
    draw = torch.randn(bsz, n, self.noise_dim, device=user.device)
    x = torch.cat([user.unsqueeze(1).expand(bsz, n, -1), b["labels"].unsqueeze(-1),
                   self.item_embed(b["items"]), draw], -1)
    x = self.out(F.gelu(self.hidden(x), approximate="tanh"))[..., 0]
    return torch.where(b["mask"], torch.sigmoid(x), torch.zeros_like(x))


def bce(logits, labels, mask):
  w = mask.float()
  loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
  return (loss * w).sum() / w.sum().clamp_min(1.0)


def _quantiles(x, w, levels):
  x, w = x.reshape(-1), w.reshape(-1)
  order = torch.argsort(torch.where(w > 0, x, torch.full_like(x, math.inf)))
  xs, ws = x[order], w[order]
  cdf = torch.cumsum(ws, 0) / ws.sum().clamp_min(1e-12)
  idx = torch.searchsorted(cdf, levels).clamp(0, x.numel() - 1)
  return xs[idx]


def distribution_loss(gen, real, labels, mask, num_quantiles: int = 64):
  """Per-class 1-D Wasserstein ``L_x`` (``dnr_jax.losses``' default estimator)."""
  levels = (torch.arange(num_quantiles, device=gen.device) + 0.5) / num_quantiles
  valid = mask.float()
  total = valid.sum().clamp_min(1.0)
  loss = gen.new_zeros(())
  for w in (valid * labels, valid * (1.0 - labels)):
    share = w.sum() / total
    if share > 0:
      d = (_quantiles(gen, w, levels) - _quantiles(real.detach(), w, levels)).abs().mean()
      loss = loss + share * d
  return loss


class TorchStep:
  """The DNR step of ``config`` in PyTorch eager on two alternating batches.

  ``run(k)`` runs ``k`` steps and waits for the device.
  """

  def __init__(self, config, lists: dict, *, phase: str, device: str = "cpu",
               seed: int = 0):
    if phase not in ("direct", "heuristic", "model"):
      raise ValueError(f"phase={phase!r}")
    torch.manual_seed(seed)
    self.config, self.phase, self.device = config, phase, torch.device(device)
    n, h = lists["items"].shape[1], lists["history"].shape[1]
    self.reranker = PRM(config.model, n, h).to(self.device)
    self.generator = Generator(config.noise, config.model).to(self.device)
    self.opt_theta = torch.optim.AdamW(self.reranker.parameters(),
                                       lr=config.learning_rate,
                                       weight_decay=config.weight_decay)
    self.opt_phi = torch.optim.AdamW(self.generator.parameters(),
                                     lr=config.generator_learning_rate, weight_decay=0.0)
    bs = config.global_batch_size
    total = lists["items"].shape[0]
    self.batches = []
    for i in range(2):
      sl = {k: np.asarray(v)[(i * bs) % total:][:bs] for k, v in lists.items()}
      self.batches.append({k: torch.as_tensor(
          v.astype(np.int64) if v.dtype.kind in "iu" else v).to(self.device)
                           for k, v in sl.items()})
    self._i = 0

  def _generated(self, b):
    noise, mask = self.config.noise, b["mask"]
    if self.phase == "heuristic":
      eps = noise.gaussian_mean + noise.gaussian_std * torch.randn_like(b["labels"])
      x = (1 - noise.lambda_c) * b["labels"] + noise.lambda_c * eps
      x = x.clamp(0.0, 1.0) if noise.clip else x
      return torch.where(mask, x, torch.zeros_like(x))
    with torch.no_grad():
      return self.generator(b)

  def step(self, b: dict) -> None:
    cfg = self.config
    # theta: L_direct (+ lambda_m L_z on generated scores), generator frozen.
    self.reranker.train()
    loss = bce(self.reranker(b, b["scores"]), b["labels"], b["mask"])
    if self.phase != "direct":
      x_gen = self._generated(b)
      loss = loss + cfg.loss.lambda_m * bce(self.reranker(b, x_gen), b["labels"],
                                            b["mask"])
    self.opt_theta.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.reranker.parameters(), cfg.grad_clip)
    self.opt_theta.step()
    if self.phase != "model":
      return
    # phi against the UPDATED theta: reranker in eval mode, its parameters frozen.
    self.reranker.eval()
    for p in self.reranker.parameters():
      p.requires_grad_(False)
    x = self.generator(b)
    l_adv = -bce(self.reranker(b, x), b["labels"], b["mask"])
    l_x = distribution_loss(x, b["scores"], b["labels"], b["mask"])
    loss_phi = cfg.loss.lambda_adv * l_adv + cfg.loss.lambda_x * l_x
    self.opt_phi.zero_grad(set_to_none=True)
    loss_phi.backward()
    torch.nn.utils.clip_grad_norm_(self.generator.parameters(), cfg.grad_clip)
    self.opt_phi.step()
    for p in self.reranker.parameters():
      p.requires_grad_(True)

  def run(self, k: int) -> None:
    for _ in range(k):
      self.step(self.batches[self._i % 2])
      self._i += 1
    if self.device.type == "cuda":
      torch.cuda.synchronize()
