"""A generated example in the own-lists format (NOT real data), with planted preferences.

What a ranking engineer would export from their own system, made up: string user and
item ids, user features (``u_segment``, ``u_country``), item features
(``i_category``, ``i_brand``), lists of varying length (some longer, some shorter
than the usual ``n = 20``) with an upstream score, the served position, the list's
time and the clicks; and an interactions file of earlier clicks (before the first
list, then every click on a list, a few seconds after it was served), from which
each list's history is taken.

The planted truth: users and items have latent vectors (items in taste clusters, and
the cluster is ``i_category``; the user's dominant cluster group is ``u_segment``);
the upstream retriever picks candidates the user tends to like and scores them with
``sigmoid(a * <u, v> + noise)``: informative but noisy. A click happens with
probability ``sigmoid(sharpness * <u, v> + item bias + c)``, so a reranker that
learns ``<u, v>`` from the history and features beats the upstream order.

The directory holds a ``NOT_REAL_DATA`` marker: the builder records ``is_real=False``
and the logs and tables say the data is generated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from dnr_jax.data import raw

LISTS_FILE = "lists.parquet"
INTERACTIONS_FILE = "interactions.parquet"
_T0 = 1_700_000_000            # seconds since the epoch (2023-11-14)
_DAY = 86_400


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """Size and truth of the generated example."""
  num_users: int = 300
  num_items: int = 400
  lists_per_user: int = 12
  min_candidates: int = 12      # lists have min..max candidates (n = 20 cuts some)
  max_candidates: int = 28
  history_clicks: int = 15      # clicks per user before the first list
  latent_dim: int = 8
  num_clusters: int = 10
  sharpness: float = 2.0        # how much <u, v> decides a click
  click_bias: float = -4.5      # about 30% of the candidates are clicked
  score_signal: float = 1.0     # how much <u, v> the upstream score knows
  score_noise: float = 1.5      # and its noise (raw score AUC about 0.76)
  seed: int = 0


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def write_example(directory: str, config: ExampleConfig = ExampleConfig()
                  ) -> tuple[str, str]:
  """Writes ``lists.parquet`` and ``interactions.parquet`` (and the marker) into
  ``directory``; returns their paths."""
  c = config
  rng = np.random.default_rng(c.seed)
  d = c.latent_dim
  centres = rng.normal(size=(c.num_clusters, d))
  cluster = rng.integers(0, c.num_clusters, c.num_items)
  item_vec = (centres[cluster] + 0.7 * rng.normal(size=(c.num_items, d))) / np.sqrt(d)
  item_bias = 0.5 * rng.normal(size=c.num_items)
  taste = rng.dirichlet(np.full(c.num_clusters, 0.3), c.num_users)
  user_vec = (taste @ centres + 0.5 * rng.normal(size=(c.num_users, d))) / np.sqrt(d)
  affinity = user_vec @ item_vec.T * np.sqrt(d)           # [users, items]
  click_p = _sigmoid(c.sharpness * affinity + item_bias[None] + c.click_bias)
  # The upstream's candidate pool: items the user tends to like, with exploration.
  pool = np.exp(1.5 * affinity)
  pool = 0.8 * pool / pool.sum(1, keepdims=True) + 0.2 / c.num_items

  user_ids = np.array([f"U{u:05d}" for u in range(c.num_users)], object)
  item_ids = np.array([f"sku-{i:05x}" for i in range(c.num_items)], object)
  segment = np.array(["A", "B", "C"], object)[taste.argmax(1) % 3]
  country = np.array(["de", "fr", "jp", "us", "br"], object)[
      rng.integers(0, 5, c.num_users)]
  category = np.array([f"cat-{k}" for k in range(c.num_clusters)], object)[cluster]
  brand = np.array([f"brand-{k}" for k in range(25)], object)[
      rng.integers(0, 25, c.num_items)]

  inter_user, inter_item, inter_time = [], [], []
  for u in range(c.num_users):   # clicks before the first list
    items = rng.choice(c.num_items, 3 * c.history_clicks, p=pool[u])
    clicked = items[rng.random(len(items)) < click_p[u, items]][:c.history_clicks]
    inter_user += [u] * len(clicked)
    inter_item += list(clicked)
    inter_time += list(np.sort(rng.integers(_T0, _T0 + 10 * _DAY, len(clicked))))
  rows: dict[str, list] = {k: [] for k in ("list_id", "user_id", "item_id", "score",
                                           "label", "position", "time", "u_segment",
                                           "u_country", "i_category", "i_brand")}
  lists = [(u, t) for u in range(c.num_users)
           for t in rng.integers(_T0 + 10 * _DAY, _T0 + 40 * _DAY, c.lists_per_user)]
  lists.sort(key=lambda ut: ut[1])         # served in time order
  for j, (u, t) in enumerate(lists):
    size = int(rng.integers(c.min_candidates, c.max_candidates + 1))
    items = rng.choice(c.num_items, size, replace=False, p=pool[u])
    score = _sigmoid(c.score_signal * affinity[u, items]
                     + c.score_noise * rng.normal(size=size) - 1.0)
    order = np.argsort(-score, kind="stable")
    items, score = items[order], score[order]
    label = (rng.random(size) < click_p[u, items]).astype(np.int8)
    rows["list_id"] += [f"req-{j:06d}"] * size
    rows["user_id"] += [user_ids[u]] * size
    rows["item_id"] += list(item_ids[items])
    rows["score"] += list(score.astype(np.float32))
    rows["label"] += list(label)
    rows["position"] += list(range(size))
    rows["time"] += [int(t)] * size
    rows["u_segment"] += [segment[u]] * size
    rows["u_country"] += [country[u]] * size
    rows["i_category"] += list(category[items])
    rows["i_brand"] += list(brand[items])
    clicked = items[label == 1]
    inter_user += [u] * len(clicked)
    inter_item += list(clicked)
    inter_time += list(int(t) + 1 + rng.integers(0, 60, len(clicked)))
  os.makedirs(directory, exist_ok=True)
  lists_path = os.path.join(directory, LISTS_FILE)
  inter_path = os.path.join(directory, INTERACTIONS_FILE)
  types = {"score": pa.float32(), "label": pa.int8(), "position": pa.int32(),
           "time": pa.int64()}
  pq.write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in rows.items()}),
                 lists_path)
  order = np.argsort(np.array(inter_time), kind="stable")
  pq.write_table(pa.table({
      "user_id": pa.array(user_ids[np.array(inter_user, np.int64)[order]]),
      "item_id": pa.array(item_ids[np.array(inter_item, np.int64)[order]]),
      "time": pa.array(np.array(inter_time, np.int64)[order])}), inter_path)
  with open(os.path.join(directory, raw.NOT_REAL_MARKER), "w") as f:
    f.write("Generated by dnr_jax.data.own_lists.sample: NOT real data.\n"
            f"{json.dumps(dataclasses.asdict(config))}\n")
  return lists_path, inter_path


def ensure_example(data_dir: str, config: ExampleConfig = ExampleConfig()
                   ) -> tuple[str, str]:
  """The example's files under ``<data_dir>/manual/own-lists-example-<hash>``,
  generated on first use (each config is its own directory)."""
  key = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True)
                       .encode()).hexdigest()[:16]
  directory = os.path.join(os.path.expanduser(data_dir), "manual",
                           f"own-lists-example-{key}")
  lists_path = os.path.join(directory, LISTS_FILE)
  inter_path = os.path.join(directory, INTERACTIONS_FILE)
  if not os.path.exists(os.path.join(directory, raw.NOT_REAL_MARKER)):
    logging.warning("generating the own-lists example in %s (NOT real data)",
                    directory)
    write_example(directory + ".incomplete", config)
    if os.path.isdir(directory):
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(directory)
    os.rename(directory + ".incomplete", directory)
  return lists_path, inter_path
