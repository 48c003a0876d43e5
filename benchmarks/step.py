r"""Benchmark of the compiled DNR steps: lists/s, compile time, memory, FLOPs.

  python -m benchmarks.step                       # the paper's shapes, batch 2048
  python -m benchmarks.step --batch_size=256 --num_heads=2 --num_layers=2   # vs PyTorch's
  python -m benchmarks.step --devices=1,2,4,8 --batch_size=64   # scaling, per-device batch
  python -m benchmarks.step --dtype=bf16
  python -m benchmarks.step --compare_torch --batch_size=256 --num_heads=2 --num_layers=2
  python -m benchmarks.step --compare_orders --steps= --batch_size=256 --num_heads=2 --num_layers=2
  python -m benchmarks.step --roofline --compare_torch --batch_size=256 --num_heads=2 --num_layers=2

Prints ONE JSON object per line and measurement. For every device count of
``--devices`` and every step of ``--steps`` (``direct``: the backbone step of
``--direct_method``; ``heuristic`` / ``model``: the Eq. 4 and the adversarial DNR step of
``--method``; ``eval``: the eval step) it compiles the step ahead of time (the compile
time is that of ``lower().compile()``), reads XLA's cost analysis of the compiled
program (FLOPs per list), runs ``--warmup`` untimed steps, then ``--repeats`` timed
repeats of ``--iters`` steps each, and reports the median lists/s with its min and max,
the achieved FLOP/s, the peak host RSS and the peak device memory where JAX reports
it (``device.memory_stats()``; CPUs report none). With ``--devices`` the batch per
device is fixed (``--batch_size`` is the per-device batch then, when more than one
count is given) and the global batch grows with the devices.

The lists are random ids and scores with the real layout (padding at the end of lists
and histories): this measures speed, not learning.

On CPU the fake devices of ``--devices`` are host devices made by
``--xla_force_host_platform_device_count``, set here before JAX is imported; they
share the machine's cores, so CPU scaling rows show overhead, not speed-up.

``--compare_torch`` also times the PyTorch eager reference (``benchmarks/torch_prm.py``,
the optional ``bench`` extra) on the same shapes, interleaved with dnr-jax repeat by
repeat, and prints the ratios (the backbone step with c score, the adversarial step).

``--compare_orders`` times the backbone step and the model step in both adversarial
orders (``--adversarial_order`` sets the order of the other records), interleaved,
and prints each order's model/backbone step-time ratio.

``--roofline`` times fp32 matrix products of the model's dense shapes (JAX, and
PyTorch with ``--compare_torch``) and prints each measured step's ceiling: its FLOPs
per list at the faster of those rates, everything else free (``benchmarks/roofline.py``),
with the measured lists/s as a fraction of it and, with ``--compare_torch``, where
twice PyTorch's lists/s would stand.

``--reference_step`` times ``benchmarks/reference_step.py``, the step as it was before
its CPU optimisations, beside the current one (interleaved; ``before`` / ``after``).

``--model_parallel=1,4`` times every step with the item and user tables replicated
and split by rows over 4 devices (``TrainConfig.model_parallel``), interleaved: the
step's cost of sharding at fixed shapes. ``--table_items=1000000,32000000`` prints one
``table_memory`` record per catalogue size and ``--model_parallel`` value on
``--table_devices`` devices: the per-device bytes of the state (analytic), XLA's
per-device memory of the compiled model step, and the bytes allocated on the fullest
device where the whole state fits in ``--allocate_limit_gb`` (``benchmarks/table_memory.py``).

  python -m benchmarks.step --steps=direct,model --devices=4 --batch_size=256 --model_parallel=1,4
  python -m benchmarks.step --steps= --table_items=100000,1000000,4000000 --model_parallel=1,4
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Optional

from absl import app, flags

STEPS = ("direct", "heuristic", "model", "eval")

flags.DEFINE_integer("batch_size", 2048, "Global batch (lists) of one step; with several "
                     "--devices counts, the batch per device.")
flags.DEFINE_integer("list_size", 50, "Candidates per list (n).")
flags.DEFINE_integer("history_size", 50, "History length (H).")
flags.DEFINE_integer("hidden", 128, "Reranker hidden size (the paper's 128).")
flags.DEFINE_integer("num_heads", 4, "Attention heads.")
flags.DEFINE_integer("num_layers", 1, "List encoder layers.")
flags.DEFINE_integer("history_layers", 1, "History encoder layers.")
flags.DEFINE_float("dropout", 0.3, "Dropout rate (the paper's 0.3).")
flags.DEFINE_string("backbone", "prm", "Reranker backbone.")
flags.DEFINE_string("method", "dnr_g", "Method of the heuristic and model steps.")
flags.DEFINE_string("direct_method", "c_score", "Method of the direct and eval steps.")
flags.DEFINE_list("dtype", ["fp32"], "Compute dtypes, from fp32, bf16 (params stay "
                  "fp32); several are timed interleaved, step by step.")
flags.DEFINE_list("steps", list(STEPS), f"Steps to measure, from {list(STEPS)}.")
flags.DEFINE_list("devices", ["1"], "Device counts (fixed per-device batch when several).")
flags.DEFINE_integer("users", 6_041, "User vocabulary (ML-1M: 6,040 users + padding).")
flags.DEFINE_integer("items", 3_707, "Item vocabulary (ML-1M: 3,706 items + padding).")
flags.DEFINE_integer("user_features", 0, "Categorical user features per list.")
flags.DEFINE_integer("item_features", 0, "Categorical item features per candidate.")
flags.DEFINE_integer("feature_vocab", 50, "Vocabulary of every feature.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median and min/max over them).")
flags.DEFINE_integer("iters", 5, "Steps per timed repeat.")
flags.DEFINE_enum("compile", "shard_map", ["shard_map", "pmap"], "Step compilation.")
flags.DEFINE_list("model_parallel", ["1"], "Row shards of the item and user tables "
                  "(TrainConfig.model_parallel); several are timed interleaved.")
flags.DEFINE_list("table_items", [], "Catalogue sizes of the table_memory records.")
flags.DEFINE_integer("table_devices", 4, "Devices of the table_memory records.")
flags.DEFINE_float("allocate_limit_gb", 4.0, "table_memory: allocate the state only "
                   "when its bytes over all devices stay under this.")
flags.DEFINE_bool("compare_torch", False,
                  "Also time the PyTorch eager reference, interleaved (needs torch).")
flags.DEFINE_enum("adversarial_order", "sequential", ["sequential", "simultaneous"],
                  "Order of the model step's two updates (TrainConfig.adversarial_order).")
flags.DEFINE_bool("compare_orders", False,
                  "Also time the backbone step and the model step in both adversarial "
                  "orders, interleaved, and print each order's model/backbone ratio.")
flags.DEFINE_bool("roofline", False,
                  "Also time fp32 matrix products of the model's dense shapes (JAX, and "
                  "PyTorch with --compare_torch) and print the lists/s ceiling they put "
                  "on each measured step (benchmarks/roofline.py).")
flags.DEFINE_bool("reference_step", False,
                  "Also time the pre-optimisation step (benchmarks/reference_step.py).")
flags.DEFINE_enum("host_allocator", "auto", ["auto", "reuse", "system"],
                  "As the binaries' flag (dnr_jax/runtime/host_allocator.py): auto keeps freed "
                  "step memory for reuse when computing on the CPU.")
flags.DEFINE_string("torch_device", "", "torch device; '': cuda when available, else cpu.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")
FLAGS = flags.FLAGS


def _set_host_devices(count: int) -> None:
  """Asks XLA for ``count`` host devices; must run before JAX is imported."""
  if "jax" in sys.modules:
    return   # Too late (e.g. under pytest); use the devices JAX already has.
  xla = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in xla and count > 1:
    os.environ["XLA_FLAGS"] = (
        xla + f" --xla_force_host_platform_device_count={count}").strip()


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KB on Linux


def emit(record: dict, out=None) -> None:
  """Prints one JSON line (and appends it to ``out``, a file object, if given)."""
  line = json.dumps(record, sort_keys=False)
  print(line, flush=True)
  if out is not None:
    out.write(line + "\n")
    out.flush()


def random_lists(num: int, *, list_size: int, history_size: int, users: int, items: int,
                 user_feature_vocab: tuple = (), item_feature_vocab: tuple = (),
                 seed: int = 0) -> dict:
  """``num`` random lists in the real layout (ids from 1, padding at the end)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  n, h = list_size, history_size
  mask = np.arange(n) < rng.integers(min(10, n), n + 1, num)[:, None]
  history_mask = np.arange(h) < rng.integers(1, h + 1, num)[:, None]
  scores = np.sort(rng.random((num, n), dtype=np.float32), axis=1)[:, ::-1] * mask
  labels = (rng.random((num, n)) < 0.2) * mask
  labels[:, 0] = 1.0   # every list has a positive (metrics skip lists without one)
  return {
      "user": rng.integers(1, users, num, dtype=np.int32),
      "history": (rng.integers(1, items, (num, h), dtype=np.int32) * history_mask),
      "history_mask": history_mask,
      "items": rng.integers(1, items, (num, n), dtype=np.int32) * mask,
      "scores": np.ascontiguousarray(scores, dtype=np.float32),
      "labels": labels.astype(np.float32),
      "mask": mask,
      "user_features": np.stack([rng.integers(1, v, num, dtype=np.int32)
                                 for v in user_feature_vocab], -1).astype(np.int32)
                       if user_feature_vocab else np.zeros((num, 0), np.int32),
      "item_features": np.stack([rng.integers(1, v, (num, n), dtype=np.int32)
                                 for v in item_feature_vocab], -1).astype(np.int32)
                       if item_feature_vocab else np.zeros((num, n, 0), np.int32),
  }


def make_config(*, method: str, batch_size: int, backbone: str = "prm",
                hidden: int = 128, num_heads: int = 4, num_layers: int = 1,
                history_layers: int = 1, dropout: float = 0.3, users: int = 6_041,
                items: int = 3_707, user_feature_vocab: tuple = (),
                item_feature_vocab: tuple = (), dtype: str = "fp32",
                compile: str = "shard_map", adversarial_order: str = "sequential",
                model_parallel: int = 1):
  """The ``TrainConfig`` of ``method`` at these shapes (generator on from epoch 0)."""
  from dnr_jax import config as config_lib
  model = config_lib.ModelConfig(
      backbone=backbone, hidden=hidden, num_heads=num_heads, num_layers=num_layers,
      history_layers=history_layers, dropout=dropout, num_items=items, num_users=users,
      user_feature_vocab=tuple(user_feature_vocab),
      item_feature_vocab=tuple(item_feature_vocab),
      compute_dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
  cfg = config_lib.TrainConfig(model=model, global_batch_size=batch_size,
                               eval_batch_size=batch_size, warmup_epochs=0,
                               compile=compile, adversarial_order=adversarial_order,
                               model_parallel=model_parallel)
  return config_lib.apply_method(cfg, method)


def _flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled program, from XLA's cost analysis (per device)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def peak_device_bytes(devices) -> Optional[int]:
  """The largest ``peak_bytes_in_use`` of ``devices``; None where JAX reports none."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


class CompiledStep:
  """One step compiled ahead of time, with placed inputs, ready to be timed.

  ``run(k)`` runs ``k`` steps and waits for them; the train steps thread the (donated)
  state through, the eval step reuses the parameters.
  """

  def __init__(self, step: str, config, devices, lists: dict, *,
               train_step: Optional[Callable] = None, seed: int = 0):
    import jax
    from jax.sharding import PartitionSpec as P
    from dnr_jax import batch as batch_lib
    from dnr_jax import step as step_lib
    from dnr_jax.runtime import runner as runner_lib
    self.step, self.config = step, config
    runner = runner_lib.Runner(config, devices=tuple(devices))
    self.num_devices = runner.num_devices
    self.global_batch = config.global_batch_size
    per_device = self.global_batch // self.num_devices
    example = batch_lib.ListBatch.from_arrays(
        {k: v[:per_device] for k, v in lists.items()})
    state = runner.put_state(step_lib.create_state(config, example,
                                                   jax.random.PRNGKey(seed)))
    # Two different batches, alternated, so no step sees a constant input.
    total = next(iter(lists.values())).shape[0]
    self.batches = [runner.put_batch({k: v[(i * self.global_batch) % total:][
        :self.global_batch] for k, v in lists.items()}) for i in range(2)]
    if step == "eval":
      fn = runner.eval_fn()
      args = (state.reranker.params, self.batches[0])
    else:
      if train_step is None:
        fn = runner.train_fn(step)
      else:   # another step body (the pre-optimisation reference), compiled alike
        fn = runner.compile_step(
            functools.partial(train_step, config=config, phase=step),
            out_specs=lambda specs: (specs, P()), donate=True)
      args = (state, self.batches[0])
    t0 = time.perf_counter()
    self.compiled = fn.lower(*args).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = _flops(self.compiled)
    self.state, self.params = state, state.reranker.params
    self._i = 0

  def run(self, k: int) -> None:
    import jax
    out = None
    for _ in range(k):
      b = self.batches[self._i % 2]
      self._i += 1
      if self.step == "eval":
        out = self.compiled(self.params, b)
      else:
        self.state, out = self.compiled(self.state, b)
    jax.block_until_ready((self.state, out))


def time_interleaved(runners: dict[str, Callable[[int], None]], *, warmup: int,
                     repeats: int, iters: int) -> dict[str, list[float]]:
  """Seconds per step of each runner, repeat by repeat, the runners interleaved.

  Interleaving puts every runner under the same background load (shared machines).
  """
  for run in runners.values():
    run(warmup)
  secs = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run(iters)
      secs[name].append((time.perf_counter() - t0) / iters)
  return secs


def summary(step_secs: list[float], lists_per_step: int) -> dict:
  """Median lists/s with min/max over repeats and the median step time."""
  rates = sorted(lists_per_step / s for s in step_secs)
  return {"lists_per_s": statistics.median(rates), "lists_per_s_min": rates[0],
          "lists_per_s_max": rates[-1],
          "step_ms_median": 1e3 * statistics.median(step_secs),
          "repeats": len(step_secs)}


def device_info(devices) -> dict:
  import jax
  from dnr_jax.runtime import host_allocator
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "devices": len(devices), "jax": jax.__version__,
          "host_allocator": host_allocator.applied()}


def shape_record(dtype: str = "fp32") -> dict:
  return {"backbone": FLAGS.backbone, "list_size": FLAGS.list_size,
          "history_size": FLAGS.history_size, "hidden": FLAGS.hidden,
          "num_heads": FLAGS.num_heads, "num_layers": FLAGS.num_layers,
          "history_layers": FLAGS.history_layers, "dtype": dtype,
          "compile": FLAGS.compile}


def _config_from_flags(method: str, batch_size: int, dtype: str = "fp32",
                       adversarial_order: Optional[str] = None, model_parallel: int = 1,
                       items: Optional[int] = None):
  return make_config(
      method=method, batch_size=batch_size, backbone=FLAGS.backbone, hidden=FLAGS.hidden,
      num_heads=FLAGS.num_heads, num_layers=FLAGS.num_layers,
      history_layers=FLAGS.history_layers, dropout=FLAGS.dropout, users=FLAGS.users,
      items=items or FLAGS.items,
      user_feature_vocab=(FLAGS.feature_vocab,) * FLAGS.user_features,
      item_feature_vocab=(FLAGS.feature_vocab,) * FLAGS.item_features, dtype=dtype,
      compile=FLAGS.compile,
      adversarial_order=adversarial_order or FLAGS.adversarial_order,
      model_parallel=model_parallel)


def lists_from_flags(num: int) -> dict:
  """``num`` random lists in the shapes the flags give."""
  return random_lists(num, list_size=FLAGS.list_size, history_size=FLAGS.history_size,
                      users=FLAGS.users, items=FLAGS.items,
                      user_feature_vocab=(FLAGS.feature_vocab,) * FLAGS.user_features,
                      item_feature_vocab=(FLAGS.feature_vocab,) * FLAGS.item_features)


def measure(step: str, devices, global_batch: int, lists: dict, out=None,
            extra: Optional[dict] = None, dtypes=("fp32",),
            model_parallels=(1,)) -> list[dict]:
  """Compiles, times and reports one step on ``devices`` (one record per dtype and
  ``model_parallel``; those that do not divide the devices are left out).

  Several dtypes and ``model_parallel`` values are timed interleaved, repeat by repeat.
  """
  method = FLAGS.direct_method if step in ("direct", "eval") else FLAGS.method
  variants = [(dt, m) for dt in dtypes for m in model_parallels if len(devices) % m == 0]
  runners = {v: CompiledStep(step, _config_from_flags(method, global_batch, v[0],
                                                      model_parallel=v[1]),
                             devices, lists) for v in variants}
  secs = time_interleaved({v: r.run for v, r in runners.items()},
                          warmup=FLAGS.warmup, repeats=FLAGS.repeats, iters=FLAGS.iters)
  per_device = global_batch // len(devices)
  records = []
  for (dt, m), runner in runners.items():
    rec = {"bench": "step", "step": step, "method": method, **shape_record(dt),
           "model_parallel": m, **device_info(devices), "global_batch": global_batch,
           "per_device_batch": per_device, **summary(secs[(dt, m)], global_batch),
           "compile_s": runner.compile_s}
    if step == "model":
      rec["adversarial_order"] = FLAGS.adversarial_order
    rec["flops_per_list"] = runner.flops / per_device if runner.flops else None
    rec["achieved_flops_per_s"] = (rec["flops_per_list"] * rec["lists_per_s"]
                                   if rec["flops_per_list"] else None)
    rec["peak_rss_gb"] = peak_rss_gb()
    rec["peak_device_bytes"] = peak_device_bytes(devices)
    rec.update(extra or {})
    emit(rec, out)
    records.append(rec)
  return records


def table_memory_records(devices, lists: dict, out=None) -> list[dict]:
  """One ``table_memory`` record per ``--table_items`` and ``--model_parallel``."""
  from benchmarks import table_memory
  records = []
  for items in (int(i) for i in FLAGS.table_items):
    for m in (int(v) for v in FLAGS.model_parallel):
      if len(devices) % m:
        continue
      config = _config_from_flags(FLAGS.method, FLAGS.batch_size, model_parallel=m,
                                  items=items)
      analytic = table_memory.analytic_bytes(config, lists)
      compiled = table_memory.compiled_memory(config, devices, lists)
      rec = {"bench": "table_memory", "items": items, "users": FLAGS.users,
             "model_parallel": m, "method": FLAGS.method, **shape_record(),
             **device_info(devices), "global_batch": FLAGS.batch_size,
             **{f"analytic_{k}": v for k, v in analytic.items()},
             **{f"compiled_{k}": v for k, v in compiled.items()},
             # Donation aliases the outputs to the arguments.
             "compiled_total_bytes": compiled["argument_bytes"] + compiled["temp_bytes"]}
      # A replicated state's bytes per device do not depend on the device count:
      # it is allocated on one device, so a size that fits once is measured.
      on = devices[:1] if m == 1 else devices
      # Creating the state takes about twice its bytes at its peak (the initialisers'
      # draws beside the outputs; measured: the allocating_process_peak_rss_gb).
      rec["allocated_bytes"] = None     # computed only: over --allocate_limit_gb
      if 2 * analytic["state_bytes"] * len(on) <= FLAGS.allocate_limit_gb * 2**30:
        try:
          rec["allocated_bytes"], rss = table_memory.allocated_in_child(
              _config_from_flags(FLAGS.method,
                                 FLAGS.batch_size // len(devices) * len(on),
                                 model_parallel=m, items=items), len(on), lists)
          rec["allocated_on_devices"] = len(on)
          rec["allocating_process_peak_rss_gb"] = rss / 2**30
        except RuntimeError as e:
          rec["allocation_failed"] = str(e)
      rec["peak_rss_gb"] = peak_rss_gb()
      emit(rec, out)
      records.append(rec)
  return records


def compare_reference(devices, lists: dict, out=None) -> list[dict]:
  """The pre-optimisation step (``reference_step.py``) vs the current one, interleaved."""
  from benchmarks import reference_step
  records = []
  for step in [s for s in FLAGS.steps if s != "eval"]:
    method = FLAGS.direct_method if step == "direct" else FLAGS.method
    config = _config_from_flags(method, FLAGS.batch_size)
    runs = {"after": CompiledStep(step, config, devices, lists),
            "before": CompiledStep(step, config, devices, lists,
                                   train_step=reference_step.train_step)}
    secs = time_interleaved({k: r.run for k, r in runs.items()}, warmup=FLAGS.warmup,
                            repeats=FLAGS.repeats, iters=FLAGS.iters)
    rec = {"bench": "before_after", "step": step, "method": method, **shape_record(),
           **device_info(devices), "global_batch": FLAGS.batch_size}
    for name in ("before", "after"):
      rec[name] = summary(secs[name], FLAGS.batch_size)
      flops = runs[name].flops
      rec[name]["flops_per_list"] = flops / FLAGS.batch_size if flops else None
    rec["speedup_median"] = rec["after"]["lists_per_s"] / rec["before"]["lists_per_s"]
    emit(rec, out)
    records.append(rec)
  return records


def compare_orders(devices, lists: dict, out=None) -> dict:
  """Backbone step vs the model step in both adversarial orders, interleaved.

  The target is a model step at most 2.0x the backbone step; Algorithm 1's
  order ("sequential", the default) and the one-pass order ("simultaneous") are
  timed in the same repeats, so their ratios compare on one machine state.
  """
  runs = {"direct": CompiledStep("direct", _config_from_flags(
      FLAGS.direct_method, FLAGS.batch_size), devices, lists)}
  for order in ("sequential", "simultaneous"):
    runs[order] = CompiledStep("model", _config_from_flags(
        FLAGS.method, FLAGS.batch_size, adversarial_order=order), devices, lists)
  secs = time_interleaved({k: r.run for k, r in runs.items()}, warmup=FLAGS.warmup,
                          repeats=FLAGS.repeats, iters=FLAGS.iters)
  rec = {"bench": "adversarial_orders", "method": FLAGS.method,
         "direct_method": FLAGS.direct_method, **shape_record(), **device_info(devices),
         "global_batch": FLAGS.batch_size}
  for name in runs:
    rec[name] = summary(secs[name], FLAGS.batch_size)
  for order in ("sequential", "simultaneous"):
    rec[f"{order}_over_direct_step_time"] = (statistics.median(secs[order])
                                             / statistics.median(secs["direct"]))
  emit(rec, out)
  return rec


def compare_torch(devices, lists: dict, out=None, torch_device: str = "") -> list[dict]:
  """dnr-jax vs the PyTorch eager reference, interleaved; backbone and model steps.

  Also reports the ratio model step / backbone step of each implementation (the target:
  dnr-jax's adversarial step at most 2.0x its backbone step).
  """
  import torch
  from benchmarks import torch_prm
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  dev = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
  records, secs_all = [], {}
  for step, method in (("direct", FLAGS.direct_method), ("model", FLAGS.method)):
    config = _config_from_flags(method, FLAGS.batch_size)
    jax_run = CompiledStep(step, config, devices, lists)
    torch_run = torch_prm.TorchStep(config, lists, phase=step, device=dev)
    secs = time_interleaved({"jax": jax_run.run, "torch": torch_run.run},
                            warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                            iters=FLAGS.iters)
    secs_all[step] = secs
    rec = {"bench": "vs_torch", "step": step, "method": method, **shape_record(),
           **device_info(devices), "torch_device": dev, "torch_version": torch.__version__,
           "torch_threads": torch.get_num_threads(), "global_batch": FLAGS.batch_size,
           # Timings under their own keys: "jax" already holds JAX's version.
           "jax_timing": summary(secs["jax"], FLAGS.batch_size),
           "torch_timing": summary(secs["torch"], FLAGS.batch_size)}
    rec["jax_over_torch"] = (rec["jax_timing"]["lists_per_s"]
                             / rec["torch_timing"]["lists_per_s"])
    rec["flops_per_list"] = jax_run.flops / FLAGS.batch_size if jax_run.flops else None
    emit(rec, out)
    records.append(rec)
  ratio = {impl: statistics.median(secs_all["model"][impl])
           / statistics.median(secs_all["direct"][impl]) for impl in ("jax", "torch")}
  emit({"bench": "vs_torch_summary", **shape_record(), **device_info(devices),
        "model_over_direct_step_time_jax": ratio["jax"],
        "model_over_direct_step_time_torch": ratio["torch"],
        "jax_over_torch_direct": records[0]["jax_over_torch"],
        "jax_over_torch_model": records[1]["jax_over_torch"]}, out)
  return records


def roofline(devices, step_records: list[dict], torch_records: list[dict],
             out=None) -> dict:
  """The matrix-product ceiling of the measured steps (``benchmarks/roofline.py``).

  Times fp32 products of the model's dense shapes over one device's tokens (JAX, and
  PyTorch when ``torch_records`` came from ``--compare_torch``), interleaved, and for
  every step measured on one device in fp32 reports its ceiling (XLA's FLOPs per list
  at the faster rate), the measured lists/s over it and, with PyTorch, twice
  PyTorch's lists/s over it: above 1, no code computing these FLOPs reaches 2x here.
  """
  from benchmarks import roofline as roofline_lib
  gemms = roofline_lib.model_gemms(FLAGS.batch_size * FLAGS.list_size, FLAGS.hidden)
  runners = {}
  for m, k, n in gemms:
    runners[f"jax {m}x{k}x{n}"] = roofline_lib.jax_gemm(m, k, n)
    if torch_records:
      runners[f"torch {m}x{k}x{n}"] = roofline_lib.torch_gemm(
          m, k, n, device=torch_records[0]["torch_device"])
  # A product takes milliseconds: more of them per repeat than steps.
  secs = time_interleaved(runners, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                          iters=10 * FLAGS.iters)
  impls = ["jax"] + (["torch"] if torch_records else [])
  rates = {impl: roofline_lib.gemm_rate(
      gemms, [statistics.median(secs[f"{impl} {m}x{k}x{n}"]) for m, k, n in gemms])
      for impl in impls}
  best = max(rates.values())
  measured = {}   # step -> (flops per list, dnr-jax lists/s, PyTorch lists/s)
  for r in step_records:
    if r["devices"] == 1 and r["dtype"] == "fp32":
      measured[r["step"]] = (r["flops_per_list"], r["lists_per_s"], None)
  for r in torch_records:
    measured[r["step"]] = (r["flops_per_list"], r["jax_timing"]["lists_per_s"],
                           r["torch_timing"]["lists_per_s"])
  steps = {}
  for step, (flops, jax_rate, torch_rate) in measured.items():
    if not flops:
      continue
    ceiling = roofline_lib.ceiling(best, flops)
    steps[step] = {"flops_per_list": flops, "ceiling_lists_per_s": ceiling,
                   "lists_per_s": jax_rate, "of_ceiling": jax_rate / ceiling}
    if torch_rate:
      steps[step].update(torch_lists_per_s=torch_rate,
                         torch_of_ceiling=torch_rate / ceiling,
                         twice_torch_over_ceiling=2 * torch_rate / ceiling)
  rec = {"bench": "roofline", **shape_record(), **device_info(devices),
         "gemms": [list(g) for g in gemms],
         **{f"{impl}_gemm_flops_per_s": rate for impl, rate in rates.items()},
         "steps": steps}
  if torch_records:
    rec["torch_device"] = torch_records[0]["torch_device"]
  emit(rec, out)
  return rec


def main(argv):
  del argv
  counts = sorted({int(d) for d in FLAGS.devices})
  bad = [s for s in FLAGS.steps if s not in STEPS] + [
      d for d in FLAGS.dtype if d not in ("fp32", "bf16")]
  if bad or not counts or counts[0] < 1:
    raise app.UsageError(f"--steps={','.join(FLAGS.steps)} must be from {list(STEPS)}, "
                         f"--dtype={','.join(FLAGS.dtype)} from fp32, bf16 and "
                         f"--devices={','.join(FLAGS.devices)} positive integers")
  _set_host_devices(max(counts + ([FLAGS.table_devices] if FLAGS.table_items else [])))
  # Before JAX starts its CPU thread pools; the same setting as the binaries'
  # default (--host_allocator=auto), and torch in this process gets it too.
  from dnr_jax.runtime import host_allocator
  host_allocator.configure(FLAGS.host_allocator)
  import jax   # after XLA_FLAGS
  available = jax.local_devices()
  if counts[-1] > len(available):
    raise app.UsageError(f"--devices={','.join(FLAGS.devices)}: only "
                         f"{len(available)} {available[0].platform} devices here")
  out_dir = os.environ.get("OUT")
  out = open(os.path.join(out_dir, "step.jsonl"), "a") if out_dir else None
  try:
    per_device = len(counts) > 1
    biggest = FLAGS.batch_size * (counts[-1] if per_device else 1)
    lists = lists_from_flags(4 * biggest)
    step_records, torch_records = [], []
    for k in counts:
      devices = available[:k]
      global_batch = FLAGS.batch_size * k if per_device else FLAGS.batch_size
      if global_batch % k:
        raise app.UsageError(f"--batch_size={global_batch} is not divisible by {k} "
                             f"devices")
      for step in FLAGS.steps:
        step_records += measure(step, devices, global_batch, lists, out,
                                dtypes=FLAGS.dtype,
                                model_parallels=[int(m) for m in FLAGS.model_parallel])
    if FLAGS.table_items:
      table_memory_records(available[:FLAGS.table_devices], lists, out)
    if FLAGS.compare_orders:
      compare_orders(available[:1], lists, out)
    if FLAGS.reference_step:
      compare_reference(available[:1], lists, out)
    if FLAGS.compare_torch:
      torch_records = compare_torch(available[:1], lists, out, FLAGS.torch_device)
    if FLAGS.roofline:
      roofline(available[:1], step_records, torch_records, out)
  finally:
    if out is not None:
      out.close()


if __name__ == "__main__":
  app.run(main)
