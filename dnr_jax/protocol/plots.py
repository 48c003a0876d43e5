"""The experiment's figures: learning curves, Figure 5's noise densities, Figure 3.

``noise_samples`` draws Figure 5's samples of ``x - z`` (the real retriever noise, the
Eq. 4 heuristics', the learned generator's); ``write_plots`` draws every figure with
matplotlib (imported only here, on use).
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dnr_jax import batch as batch_lib
from dnr_jax import config as config_lib
from dnr_jax import noise as noise_lib
from dnr_jax.data import types
from dnr_jax.runtime import pipeline


def noise_samples(data: types.PreparedLists, noise: config_lib.NoiseConfig,
                  model: config_lib.ModelConfig, generator_params=None,
                  max_lists: int = 2048, seed: int = 0) -> dict[str, np.ndarray]:
  """Figure 5's samples of ``x - z`` on test lists (valid candidates only).

  Returns ``{"real", "gaussian", "beta"}`` and, with ``generator_params``,
  ``"learned"``: the real retriever noise, the two heuristics' (Eq. 4, the config's
  ``lambda_c``) and the trained model generator's.
  """
  arrays = pipeline.complete(data.splits["test"])
  arrays = {k: v[:max_lists] for k, v in arrays.items()}
  b = batch_lib.ListBatch.from_arrays({k: jnp.asarray(v) for k, v in arrays.items()})
  valid = np.asarray(b.mask)
  z = np.asarray(b.labels)
  key = jax.random.PRNGKey(seed)
  out = {"real": (np.asarray(b.scores) - z)[valid]}
  for name in ("gaussian", "beta"):
    x = noise_lib.heuristic_scores(key, b.labels, b.mask,
                                   dataclasses.replace(noise, heuristic=name))
    out[name] = (np.asarray(x) - z)[valid]
  if generator_params is not None:
    gen = noise_lib.make_generator(noise, model)
    x = gen.apply({"params": generator_params}, b, rngs={"noise": key})
    out["learned"] = (np.asarray(x) - z)[valid]
  return out


def write_plots(workdir: str, histories: dict, noise: dict, sweep: list[dict],
           baseline: Optional[tuple[str, float]], k: int) -> list[str]:
  """Writes the PNG plots into ``workdir/plots``; returns their paths.

  Args:
    histories: ``{(backbone, method): [per-seed history]}`` (learning curves).
    noise: ``noise_samples``'s output (Figure 5); empty: no Figure 5.
    sweep: the sweep points (Figure 3); empty: no Figure 3.
    baseline: ``(name, mean test NDCG)`` of the best baseline, drawn on Figure 3.
    k: the K of NDCG@K.
  """
  # A first import on a new machine builds matplotlib's font cache and says so as a
  # warning; it is a one-off pause, not a problem with the plots.
  pylogging.getLogger("matplotlib.font_manager").setLevel(pylogging.ERROR)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  paths = []
  # Learning curves: validation NDCG@K and the reranker's training loss, seed-mean.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for (backbone, method), hs in sorted(histories.items()):
    epochs = min(len(h) for h in hs)
    ndcg = np.mean([[r["valid"]["ndcg"] for r in h[:epochs]] for h in hs], 0)
    loss = np.mean([[r["train"]["l_direct"] for r in h[:epochs]] for h in hs], 0)
    label = f"{backbone}/{method}"
    axes[0].plot(range(1, epochs + 1), 100 * ndcg, label=label)
    axes[1].plot(range(1, epochs + 1), loss, label=label)
  axes[0].set(xlabel="epoch", ylabel=f"valid NDCG@{k} (%)", title="Learning curves")
  axes[1].set(xlabel="epoch", ylabel="train L_direct")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "plots", "learning_curves.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  # Figure 5: noise densities.
  if noise:
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 81)
    for name, vals in noise.items():
      ax.hist(vals, bins=bins, density=True, histtype="step", label=name, lw=1.5)
    ax.set(xlabel="x - z", ylabel="density",
           title="Retriever noise vs generated noise (Figure 5)")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(workdir, "plots", "noise_density.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  # Figure 3: sensitivity, one panel per swept field, the best baseline as a line.
  fields = list(dict.fromkeys(p["field"] for p in sweep))
  if fields:
    fig, axes = plt.subplots(1, len(fields), figsize=(4.5 * len(fields), 4),
                             squeeze=False)
    for ax, field in zip(axes[0], fields):
      points = [p for p in sweep if p["field"] == field]
      vals = sorted({p["value"] for p in points})
      ndcg = [[p["ndcg"] for p in points if p["value"] == v] for v in vals]
      ax.errorbar(vals, [100 * np.mean(n) for n in ndcg],
                  # The table's spread: the sample std over seeds (0 for one seed).
                  yerr=[100 * np.std(n, ddof=1) if len(n) > 1 else 0.0 for n in ndcg],
                  marker="o",
                  label=f"{points[0]['method']}, test")
      valid = [[p["valid_ndcg"] for p in points if p["value"] == v and "valid_ndcg" in p]
               for v in vals]
      if all(valid):   # the curve a value is chosen on
        ax.plot(vals, [100 * np.mean(n) for n in valid], marker="s", ls=":",
                label=f"{points[0]['method']}, validation")
      if baseline is not None:
        ax.axhline(100 * baseline[1], color="gray", ls="--", label=baseline[0])
      ax.set(xlabel=field, ylabel=f"NDCG@{k} (%)", title=f"Sensitivity: {field}")
      ax.legend(fontsize=7)
    fig.suptitle("Figure 3: sensitivity (mean ± std over seeds)")
    fig.tight_layout()
    paths.append(os.path.join(workdir, "plots", "sensitivity.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths
