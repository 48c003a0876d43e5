"""Typed configuration for dnr-jax. The library reads these, never flags.

Every open point of the paper (``docs/paper.md``, "Open points") that the method
touches is a field here, with the choice this project makes as its default and the
reason in a comment. ``validate`` checks a whole config at start, so a bad value
fails before any compilation with a message that names it.

Every method of the paper's tables is a configuration of the same train step; see
``METHODS`` and ``apply_method``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, Optional

from dnr_jax.errors import ConfigError

BACKBONES = ("prm", "setrank", "dlcm", "pier")
SCORE_USAGES = ("none", "concat", "add", "weight")
HEURISTICS = ("gaussian", "beta")
LX_ESTIMATORS = ("histogram_kl", "wasserstein", "mmd")
COMPILERS = ("pmap", "shard_map")
MAP_NORMALISERS = ("min_pos_k", "hits")
COMPUTE_DTYPES = ("float32", "bfloat16")
NONFINITE = ("stop", "skip")
RESUME_MODES = ("check", "force", "never")
ADVERSARIAL_ORDERS = ("sequential", "simultaneous")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The reranker backbone (``q_theta``)."""
  backbone: str = "prm"
  # Vocabulary sizes include the padding id 0: ids run 1..num_items-1.
  num_items: int = 1
  num_users: int = 1
  user_feature_vocab: tuple[int, ...] = ()
  item_feature_vocab: tuple[int, ...] = ()
  hidden: int = 128            # paper: hidden size 128
  num_heads: int = 4
  num_layers: int = 1          # list encoder depth (PRM / SetRank)
  history_layers: int = 1      # user-history encoder depth
  # PIER only: the history is read as past pseudo-permutations of this many items
  # (dnr_jax/models/pier.py says why: our histories hold positives, not shown lists).
  pier_window: int = 5
  # PIER only: rank each evaluated list by FPSM's permutation search
  # (pier.fpsm_search: this many candidate permutations, the top-k by SimHash
  # similarity to the history scored by OCPM) instead of by sorting the logits.
  # 0 = off (the default ranking, as every other backbone).
  fpsm_permutations: int = 0
  fpsm_top_k: int = 4
  dropout: float = 0.3         # paper, ML-1M and Kuaivideo
  # Open point 3: how retriever scores enter the backbone. "concat" = the paper's
  # "c score" (a score embedding concatenated to the item token), "add" = "+ score"
  # (added to it), "weight" = "w score" (the item token is multiplied by the score,
  # which scales the item's whole representation before the list encoder), "none" =
  # the backbone alone. The score embedding is a small MLP on the scalar score, not a
  # bucket lookup, so that L_adv can differentiate through it to the generator.
  score_usage: str = "concat"
  # Dtype of the backbone's activations and matmuls: "bfloat16" halves the memory
  # traffic and uses the accelerators' bf16 units; parameters, optimiser state,
  # losses and the generator stay float32 (mixed precision).
  compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """The noise generator ``f_phi`` and Eq. 4, ``x' = (1 - lambda_c) z + lambda_c eps``."""
  heuristic: str = "gaussian"  # warm-up generator: "gaussian" (DNR-G) or "beta" (DNR-B)
  lambda_c: float = 0.4        # paper, ML-1M
  # Open point 4: eps ~ N(mean, std). Centred on 0.5 so that, mixed with z, positives
  # and negatives are pulled toward the middle of [0, 1] the way retriever scores are.
  gaussian_mean: float = 0.5
  gaussian_std: float = 0.25
  beta_a: float = 0.5          # paper default Beta(0.5, 0.5); it also tried (2, 5)
  beta_b: float = 0.5
  # Open point 4: clip x' to [0, 1] (Gaussian eps can leave it; Beta eps cannot).
  clip: bool = True
  # Open point 2: the model generator is a 2-layer MLP on [user state, z, item
  # embedding, a N(0, 1) draw]; its own embeddings (the players share no parameters);
  # output squashed by a sigmoid into (0, 1) and used directly (lambda_c treated as 1).
  generator_hidden: int = 64
  generator_noise_dim: int = 8
  generator_use_item: bool = True
  # Open point 3 again: candidates are stored in the real retriever's rank order and
  # PRM / DLCM read that order. False (the paper's plain reading: swap the scores,
  # keep the list) leaves the real order beside the generated scores x'. True
  # re-sorts each list by x', so order and scores agree as on real lists. Measured
  # (docs/dnr_investigation.md): with Eq. 4 noise, re-sorting teaches the position
  # embedding that the top of a list is almost surely positive (x' nearly reveals
  # z), which real lists contradict: heuristic_g lost 1.8 N@6 on synthetic lists.
  sort_generated: bool = False


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights and estimators of Eq. 5's terms."""
  lambda_m: float = 0.4        # weight of L_z in the reranker loss (paper, ML-1M)
  lambda_adv: float = 1.0      # weight of L_adv in the generator loss (paper: none given)
  lambda_x: float = 1.0        # weight of L_x in the generator loss (paper: none given)
  # Open point 1: the L_x estimator, and matching per label class (x'|z against x|z).
  lx_estimator: str = "wasserstein"
  lx_per_class: bool = True
  lx_bins: int = 32            # soft-histogram bins on [0, 1]
  lx_bandwidth: float = 0.05   # soft-histogram kernel width; also the MMD kernel width


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run: backbone, noise, losses, schedule and the device layout."""
  model: ModelConfig = ModelConfig()
  noise: NoiseConfig = NoiseConfig()
  loss: LossConfig = LossConfig()
  method: str = "dnr_g"
  # Algorithm 1's lambda_e: epochs of heuristic noise before the model generator takes
  # over. ``use_generator=False`` never switches (the "heuristic only" rows).
  warmup_epochs: int = 40
  use_generator: bool = True
  # The adversarial phase's order. "sequential" is Algorithm 1: theta is updated, then
  # phi against the UPDATED theta (the reranker run again, without dropout).
  # "simultaneous" computes phi's gradient from theta's own forward and backward pass
  # (phi against the pre-update, dropout-on reranker): fewer passes, another method
  # (dnr_jax/step.py, simultaneous_grads; docs/dnr_investigation.md).
  adversarial_order: str = "sequential"
  num_epochs: int = 50           # with early stopping: the maximum
  # Training to convergence (dnr_jax.runtime.early_stopping): stop after this many epochs
  # without a validation NDCG@K gain of more than early_stopping_min_delta (never
  # before a DNR run's generator has had as many epochs); 0: train num_epochs.
  early_stopping_patience: int = 0
  early_stopping_min_delta: float = 0.0
  # No early stop before this epoch, for every method: a row that sits on a plateau
  # in its first epochs would otherwise stop there, under-trained, while the rows
  # beside it train on (seen on real MovieLens-100k: docs/real_data.md).
  early_stopping_min_epochs: int = 0
  global_batch_size: int = 2048  # paper: 2048, across all devices
  learning_rate: float = 1e-3
  weight_decay: float = 1e-3
  generator_learning_rate: float = 1e-3
  grad_clip: float = 1.0
  seed: int = 0
  # The same per-device body compiled by jax.jit(jax.shard_map(...)) (the default:
  # the current JAX path, one program for one host or many) or by jax.pmap. pmap
  # keeps every executable it ever compiled (measured on JAX 0.10: ~2,800 memory
  # maps per DNR run), so a long experiment of many runs exhausts the process's map
  # limit under pmap; the experiment runner clears JAX's caches between runs.
  compile: str = "shard_map"
  # Row-sharded embedding tables (dnr_jax/models/tables.py): the devices form a
  # ('batch', 'model') mesh with model_parallel devices along 'model'; the item and
  # user tables and their optimiser moments are split by rows over 'model', the rest
  # is replicated, and the global batch is split over all devices as with 1.
  # 1: every device holds every table (one 'batch' axis). shard_map only.
  model_parallel: int = 1
  eval_k: int = 6
  map_normaliser: str = "min_pos_k"
  eval_batch_size: int = 0       # 0: same as global_batch_size
  # Also evaluate the test lists with each list's scores shuffled among its
  # candidates (test metric "ndcg_shuffled_scores"): how much the reranker relies on
  # the retriever's scores, beyond their order (positions keep the real order).
  eval_shuffled_scores: bool = True
  log_every_steps: int = 50
  checkpoint_every_epochs: int = 1
  keep_checkpoints: int = 2
  # A step whose loss or gradient norm is NaN/inf is never applied (checked inside
  # the compiled step). "stop": the run raises errors.TrainingDiverged at the next
  # check (the epoch's end, or a log_every_steps line); "skip": the run goes on and
  # counts the skipped steps (train metric "skipped_steps").
  nonfinite: str = "stop"
  # A workdir that already holds checkpoints: "check" resumes only with the same
  # config (checkpoints.RESUMABLE_FIELDS may differ), "force" resumes anyway,
  # "never" moves the old checkpoints aside and starts fresh.
  resume: str = "check"


# name -> (overrides of TrainConfig, ModelConfig, NoiseConfig, LossConfig), the paper's
# table rows. Rows that use no generated scores set lambda_m = 0, and the step then
# skips the noise and generator work entirely (it is not merely weighted by zero).
METHODS: dict[str, dict[str, dict]] = {
    "backbone": dict(train=dict(use_generator=False), model=dict(score_usage="none"),
                     loss=dict(lambda_m=0.0)),
    "c_score": dict(train=dict(use_generator=False), model=dict(score_usage="concat"),
                    loss=dict(lambda_m=0.0)),
    "add_score": dict(train=dict(use_generator=False), model=dict(score_usage="add"),
                      loss=dict(lambda_m=0.0)),
    "w_score": dict(train=dict(use_generator=False), model=dict(score_usage="weight"),
                    loss=dict(lambda_m=0.0)),
    "heuristic_g": dict(train=dict(use_generator=False), noise=dict(heuristic="gaussian")),
    "heuristic_b": dict(train=dict(use_generator=False), noise=dict(heuristic="beta")),
    "dnr_g": dict(train=dict(use_generator=True), noise=dict(heuristic="gaussian")),
    "dnr_b": dict(train=dict(use_generator=True), noise=dict(heuristic="beta")),
    "dnr_g_no_adv": dict(train=dict(use_generator=True), noise=dict(heuristic="gaussian"),
                         loss=dict(lambda_adv=0.0)),
    "dnr_g_no_lx": dict(train=dict(use_generator=True), noise=dict(heuristic="gaussian"),
                        loss=dict(lambda_x=0.0)),
}


# The method each score usage gives when no generated score is used (lambda_m = 0).
SCORE_BASELINES = {"none": "backbone", "concat": "c_score", "add": "add_score",
                   "weight": "w_score"}


def apply_method(config: TrainConfig, method: str) -> TrainConfig:
  """Returns ``config`` with the fields that define ``method`` (a ``METHODS`` key) set.

  Fields a method does not name keep their values, so apply the method first and the
  user's explicit overrides after it.
  """
  if method not in METHODS:
    raise ConfigError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
  o = METHODS[method]
  return dataclasses.replace(
      config, method=method,
      model=dataclasses.replace(config.model, **o.get("model", {})),
      noise=dataclasses.replace(config.noise, **o.get("noise", {})),
      loss=dataclasses.replace(config.loss, **o.get("loss", {})),
      **o.get("train", {}))


def with_overrides(config: TrainConfig, overrides) -> TrainConfig:
  """Returns ``config`` with dotted-key overrides set, e.g. ``{"loss.lambda_x": 0.5}``.

  Keys name a ``TrainConfig`` field (``"num_epochs"``) or a field of one of its
  sections (``"model.hidden"``, ``"noise.lambda_c"``, ``"loss.lx_estimator"``).
  Unknown keys raise ``ConfigError`` naming them.
  """
  sections: dict = {}
  top = {}
  for key, value in dict(overrides).items():
    section, _, field = key.rpartition(".")
    if section not in ("", "model", "noise", "loss") or field not in {
        f.name for f in dataclasses.fields(getattr(config, section) if section
                                           else config)}:
      raise ConfigError(f"unknown config field {key!r}")
    (sections.setdefault(section, {}) if section else top)[field] = value
  return dataclasses.replace(
      config, **top, **{name: dataclasses.replace(getattr(config, name), **fields)
                        for name, fields in sections.items()})


def field_type(config: TrainConfig, key: str) -> type:
  """The type of the dotted field ``key`` (``"noise.lambda_c"`` -> ``float``)."""
  section, _, field = key.rpartition(".")
  obj = getattr(config, section) if section in ("model", "noise", "loss") else (
      config if not section else None)
  if obj is None or field not in {f.name for f in dataclasses.fields(obj)}:
    raise ConfigError(f"unknown config field {key!r}")
  return type(getattr(obj, field))


def parse_value(config: TrainConfig, key: str, text: str):
  """``text`` as a value of the dotted field ``key``, with the field's type.

  ``"4"`` is an int for ``warmup_epochs`` and a float for ``noise.lambda_c``;
  booleans accept true/false/1/0. Raises ``ConfigError`` naming the field.
  """
  kind = field_type(config, key)
  text = str(text).strip()
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(text)
      return text.lower() in ("true", "1")
    if kind is int:
      value = float(text)
      if not value.is_integer():
        raise ConfigError(text)
      return int(value)
    if kind is float:
      return float(text)
    if kind is tuple:
      raise ConfigError("tuple fields cannot be overridden from text")
    return text
  except ValueError as e:
    raise ConfigError(f"{key}={text!r} is not a valid {kind.__name__}") from e


def to_dict(config) -> dict:
  """A config dataclass as plain JSON values (tuples become lists, as JSON reads them).

  The one serialiser of configs: checkpoints, bundles, results and exports all write
  this, and ``from_dict`` reads it back.
  """
  def plain(v):
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    return v
  return plain(dataclasses.asdict(config))


def _from_dict(cls, d: Mapping[str, Any], where: str):
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ConfigError(f"{where}: unknown config fields {unknown} (written by a newer "
                      "dnr-jax?)")
  hints = typing.get_type_hints(cls)
  out = {}
  for name, value in d.items():
    kind = hints[name]
    if dataclasses.is_dataclass(kind):
      value = _from_dict(kind, value, f"{where}.{name}")
    elif typing.get_origin(kind) is tuple:
      value = tuple(value)
    out[name] = value
  # A field the file lacks keeps its default: a field is added with the old
  # behaviour as its default, so older files still mean what they meant.
  return cls(**out)


def from_dict(d: Mapping[str, Any], where: str = "config") -> TrainConfig:
  """The ``TrainConfig`` that ``to_dict`` wrote; ``where`` names the source in errors."""
  return _from_dict(TrainConfig, d, where)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested config dict as dotted keys (``{"model.hidden": 128, ...}``)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def uses_noise(config: TrainConfig) -> bool:
  """Whether the method trains on generated scores at all (``L_z`` has weight > 0)."""
  return config.loss.lambda_m > 0


def generator_active(config: TrainConfig, epoch: int) -> bool:
  """Algorithm 1: the model generator replaces the heuristic after ``warmup_epochs``."""
  return uses_noise(config) and config.use_generator and epoch >= config.warmup_epochs


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def _in(value, choices, name):
  _check(value in choices, f"{name}={value!r} is not one of {list(choices)}")


def validate(config: TrainConfig, *, list_size: Optional[int] = None,
             num_devices: Optional[int] = None, vocab: bool = True) -> None:
  """Raises ``ConfigError`` (a ``ValueError``) naming the first bad value of ``config``.

  Args:
    config: the run's configuration.
    list_size: ``n``, the candidates per list, when known (checks ``eval_k <= n``).
    num_devices: devices the step runs on, when known (checks batch divisibility).
    vocab: check the vocabulary sizes (off before the data set, which sets them, is
      loaded).
  """
  m, nz, ls = config.model, config.noise, config.loss
  _in(config.method, METHODS, "method")
  _in(m.backbone, BACKBONES, "model.backbone")
  _in(m.score_usage, SCORE_USAGES, "model.score_usage")
  _in(m.compute_dtype, COMPUTE_DTYPES, "model.compute_dtype")
  _in(nz.heuristic, HEURISTICS, "noise.heuristic")
  _in(ls.lx_estimator, LX_ESTIMATORS, "loss.lx_estimator")
  _in(config.compile, COMPILERS, "compile")
  _in(config.map_normaliser, MAP_NORMALISERS, "map_normaliser")
  _in(config.nonfinite, NONFINITE, "nonfinite")
  _in(config.adversarial_order, ADVERSARIAL_ORDERS, "adversarial_order")
  _in(config.resume, RESUME_MODES, "resume")
  if vocab:
    _check(m.num_items >= 2,
           f"model.num_items={m.num_items} must be >= 2 (id 0 is padding)")
    _check(m.num_users >= 1, f"model.num_users={m.num_users} must be >= 1")
  for name in ("hidden", "num_heads", "num_layers", "history_layers", "pier_window"):
    v = getattr(m, name)
    _check(isinstance(v, int) and v >= 1, f"model.{name}={v!r} must be an integer >= 1")
  if m.fpsm_permutations:
    _check(m.backbone == "pier", f"model.fpsm_permutations={m.fpsm_permutations} "
           f"needs model.backbone='pier', got {m.backbone!r}")
    _check(m.fpsm_permutations >= 2 and 1 <= m.fpsm_top_k <= m.fpsm_permutations,
           f"model.fpsm_permutations={m.fpsm_permutations} must be >= 2 and "
           f"model.fpsm_top_k={m.fpsm_top_k} in [1, fpsm_permutations]")
  _check(m.hidden % m.num_heads == 0,
         f"model.hidden={m.hidden} must be divisible by model.num_heads={m.num_heads}")
  _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
  _check(0.0 <= nz.lambda_c <= 1.0, f"noise.lambda_c={nz.lambda_c} must be in [0, 1]")
  _check(nz.gaussian_std > 0, f"noise.gaussian_std={nz.gaussian_std} must be > 0")
  _check(nz.beta_a > 0 and nz.beta_b > 0,
         f"noise.beta_a={nz.beta_a}, noise.beta_b={nz.beta_b} must both be > 0")
  _check(nz.generator_hidden >= 1 and nz.generator_noise_dim >= 1,
         "noise.generator_hidden and noise.generator_noise_dim must be >= 1")
  for name in ("lambda_m", "lambda_adv", "lambda_x"):
    v = getattr(ls, name)
    _check(math.isfinite(v) and v >= 0, f"loss.{name}={v} must be finite and >= 0")
  # With lambda_m = 0 the step skips the noise and the generator (``uses_noise``), so
  # a method defined by its generated scores would be, bit for bit, the baseline of its
  # score usage under another name: a table row must be what its label says.
  if ls.lambda_m == 0 and METHODS.get(config.method, {}).get("loss", {}).get(
      "lambda_m") != 0.0:
    same = SCORE_BASELINES[m.score_usage]
    raise ConfigError(
        f"method={config.method} with loss.lambda_m=0 is {same}: L_z gets no weight, "
        f"so no generated score is ever used; run {same} instead, or set lambda_m > 0")
  # Likewise a method whose model generator never gets an epoch is its heuristic-only
  # row under another name.
  if (uses_noise(config) and config.use_generator
      and config.warmup_epochs >= config.num_epochs):
    raise ConfigError(
        f"method={config.method} with warmup_epochs={config.warmup_epochs} >= "
        f"num_epochs={config.num_epochs} never trains its model generator (only the "
        "heuristic warm-up runs): lower warmup_epochs, raise num_epochs, or run a "
        "heuristic_* method")
  _check(ls.lx_bins >= 2, f"loss.lx_bins={ls.lx_bins} must be >= 2")
  _check(ls.lx_bandwidth > 0, f"loss.lx_bandwidth={ls.lx_bandwidth} must be > 0")
  _check(config.warmup_epochs >= 0, f"warmup_epochs={config.warmup_epochs} must be >= 0")
  _check(config.num_epochs >= 1, f"num_epochs={config.num_epochs} must be >= 1")
  _check(config.early_stopping_patience >= 0,
         f"early_stopping_patience={config.early_stopping_patience} must be >= 0")
  _check(config.early_stopping_min_epochs >= 0,
         f"early_stopping_min_epochs={config.early_stopping_min_epochs} must be >= 0")
  _check(config.early_stopping_min_delta >= 0,
         f"early_stopping_min_delta={config.early_stopping_min_delta} must be >= 0")
  _check(config.global_batch_size >= 1,
         f"global_batch_size={config.global_batch_size} must be >= 1")
  for name in ("learning_rate", "generator_learning_rate"):
    v = getattr(config, name)
    _check(v > 0, f"{name}={v} must be > 0")
  _check(config.weight_decay >= 0, f"weight_decay={config.weight_decay} must be >= 0")
  _check(config.eval_k >= 1, f"eval_k={config.eval_k} must be >= 1")
  if list_size is not None:
    _check(config.eval_k <= list_size,
           f"eval_k={config.eval_k} exceeds the list size n={list_size}")
  _check(isinstance(config.model_parallel, int) and config.model_parallel >= 1,
         f"model_parallel={config.model_parallel!r} must be an integer >= 1")
  _check(config.model_parallel == 1 or config.compile == "shard_map",
         f"model_parallel={config.model_parallel} needs compile='shard_map' (pmap has "
         "one mesh axis)")
  if num_devices is not None:
    _check(num_devices % config.model_parallel == 0,
           f"model_parallel={config.model_parallel} does not divide the {num_devices} "
           "devices")
    for name in ("global_batch_size", "eval_batch_size"):
      v = getattr(config, name)
      _check(v % num_devices == 0,
             f"{name}={v} is not divisible by the {num_devices} devices")
