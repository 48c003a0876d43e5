"""The reranker as LitServe's API: the request body, batching, scoring, replies.

``RerankBody`` is FastAPI's body type of ``POST /rerank``: it checks a request in the
HTTP process (``requests.check_request``), so a bad one is answered 400 there and
never joins a batch. ``RerankAPI`` is the inference worker's side: it loads the
bundle, compiles every padded batch size at start-up, and scores each batch with the
training run's eval program.

(No ``from __future__ import annotations`` in this file: LitServe reads
``RerankAPI.decode_request``'s annotation as FastAPI's body type, and a string would
make it a query field.)
"""

import gc
import json
import os
import signal
import sys
import time
from typing import Any, Optional

import litserve as ls
import numpy as np
import pydantic
import starlette.responses
from absl import logging

from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online import requests as requests_lib

PATH = "/rerank"


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
  """The padded batch sizes: powers of two up to ``max_batch_size``."""
  return tuple(1 << i for i in range(max_batch_size.bit_length()))


def _bucket(size: int, buckets: tuple[int, ...]) -> int:
  return next(b for b in buckets if b >= size)


# The limits the HTTP process checks bodies against. Set (``set_limits``) by
# ``service.build_server`` in the main process before LitServe forks its HTTP
# processes, which inherit it; the pydantic body below is a module-level class (the
# worker unpickles it by name), so it cannot carry them itself.
_LIMITS: Optional[requests_lib.RequestLimits] = None


def set_limits(limits: requests_lib.RequestLimits) -> None:
  """The limits ``RerankBody`` checks requests against, in this process and the ones
  forked from it."""
  global _LIMITS
  _LIMITS = limits


class RerankBody(pydantic.BaseModel):
  """One checked request (``requests.check_request``) as FastAPI's body type."""
  checked: Any

  @pydantic.model_validator(mode="before")
  @classmethod
  def _check(cls, data):
    if _LIMITS is None:
      raise ValueError("service: not configured (build_server sets the limits)")
    return {"checked": requests_lib.check_request(data, _LIMITS)}

  def __repr__(self) -> str:
    # LitServe formats every request into a debug-log f-string, logged or not;
    # pydantic's repr would walk the whole checked list (5% of the HTTP process's
    # time under load).
    return f"RerankBody({len(self.checked.item_ids)} candidates)"

  __str__ = __repr__


def error_line(exc) -> str:
  """The one line of a FastAPI validation error (a bad or malformed body)."""
  errs = exc.errors() if hasattr(exc, "errors") else []
  if not errs:
    return f"body: {exc}"
  e = errs[0]
  if e.get("type") == "json_invalid":
    return f"body: malformed JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
  if e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",):
    return "body: missing (send one list as a JSON object)"
  error = e.get("ctx", {}).get("error")
  if isinstance(error, requests_lib.RequestError):
    return str(error)
  loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
  return f"{loc}: {e.get('msg')}"


class RerankAPI(ls.LitAPI):
  """The reranker as LitServe's API: decode (already checked), batch, score, reply."""

  def __init__(self, bundle_dir: str, limits: requests_lib.RequestLimits, drained, *,
               max_batch_size: int, batch_timeout_ms: float):
    super().__init__(max_batch_size=max_batch_size,
                     batch_timeout=batch_timeout_ms / 1000.0, api_path=PATH)
    self.bundle_dir, self.limits, self.drained = bundle_dir, limits, drained
    self.buckets = bucket_sizes(max_batch_size)

  def setup(self, device):
    # The main process drains the HTTP side first; this worker must go on answering
    # until then, whatever signal the process group received.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, self._on_term)
    self.parent = os.getppid()
    import jax  # pylint: disable=g-import-not-at-top
    from dnr_jax.runtime import runner as runner_lib  # pylint: disable=g-import-not-at-top
    from dnr_jax.serving import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
    bundle = bundle_lib.load_bundle(self.bundle_dir)
    self.vocab = bundle.vocabulary()
    index = int(str(device).rpartition(":")[2]) if ":" in str(device) else 0
    jax_device = jax.local_devices()[index]
    self.runner = runner_lib.Runner(bundle.config, (jax_device,))
    self.params = self.runner.put_state(jax.tree.map(np.asarray, bundle.params))
    t0 = time.time()
    warm = requests_lib.CheckedRequest(user_id="", item_ids=["?"], scores=[0.5],
                                       history=[], user_features={},
                                       item_features={})
    for b in self.buckets:
      self._score([warm] * b)
    # JAX's and the model's objects stay for the worker's life: keep full collections
    # under load from walking them.
    gc.collect()
    gc.freeze()
    logging.info("reranker %s (%s/%s) ready on %s: batch sizes %s compiled in %.1fs",
                 self.bundle_dir, bundle.config.model.backbone, bundle.config.method,
                 jax_device, list(self.buckets), time.time() - t0)

  def _on_term(self, signum, frame):
    del signum, frame
    # After the drain, or when the main process is gone (killed outright: nobody
    # will drain), a SIGTERM stops the worker; before, it is the main process's job.
    if self.drained.is_set() or os.getppid() != self.parent:
      sys.exit(0)

  def _score(self, batch):
    arrays, unknown = requests_lib.encode(batch, self.vocab, self.limits)
    size = _bucket(len(batch), self.buckets)
    pad = size - len(batch)
    padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              if pad else v for k, v in arrays.items()}
    _, logits = self.runner.evaluate_params(self.params, padded)
    logits = np.asarray(logits)[:len(batch)]
    return requests_lib.replies(batch, logits, arrays["mask"], unknown), unknown

  async def authorize(self) -> None:
    """No authentication (put the service behind your gateway's). Async, so FastAPI
    runs it on the event loop instead of handing every request to a thread (LitServe's
    default dependency is a sync function)."""

  def decode_request(self, request: RerankBody):
    return request.checked

  def batch(self, inputs):
    return list(inputs)

  def predict(self, x):
    out, unknown = self._score(x)
    m = metrics_lib.get()
    m.batch_size.observe(len(x))
    m.lists.inc(len(x))
    for column, counts in unknown.items():
      total = int(counts.sum())
      if total:
        m.unknown_ids.labels(column=column).inc(total)
    return out

  def unbatch(self, output):
    return output

  def encode_response(self, output):
    # The reply's JSON is made here, in the worker, and travels as a finished
    # response: the HTTP process (the busier one) then does not encode it again.
    return starlette.responses.Response(
        json.dumps(output, separators=(",", ":")).encode(),
        media_type="application/json")
