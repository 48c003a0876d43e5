"""The service's request path in one process: HTTP, checks, batching and the model.

An ASGI app for uvicorn (``--factory``, one process per ``--workers``), built from
the service's own parts: ``endpoint.read_body`` and ``requests.check_request`` read
and check a body with the service's one-line errors; ``batches.encode`` maps a batch
through the vocabulary; ``Runner.score_params`` scores it; ``batches.replies`` and
orjson write the replies. What differs from the service is where they run: there is
no second process, no pipe and no LitServe. A request, once checked, waits on the
event loop until the oldest waiting request has waited ``DNR_INLINE_DELAY_MS``
(1 ms; the service's rule, ``batching.QueueDelayLoop``) or ``DNR_INLINE_MAX_BATCH``
(64) requests wait; then they are scored as one batch on the event loop's own
thread, while the next requests wait in the sockets. (``DNR_INLINE_DELAY_MS=0``:
every request checked in one turn of the event loop, scored at the end of it.)

With ``DNR_INLINE_PIN_DIR`` set, each process binds itself to a core of its own.

A prototype for measuring (``run.py``): only ``POST /rerank`` and ``GET /ready``; no
metrics, no ``/rerank_lists``, no drain, no request timeout, no body limit.
"""

import asyncio
import gc
import json
import os

import jax
import numpy as np
import orjson

from dnr_jax.runtime import runner as runner_lib
from dnr_jax.serving import bundle as bundle_lib
from dnr_jax.serving.online import api
from dnr_jax.serving.online import batches
from dnr_jax.serving.online import endpoint
from dnr_jax.serving.online import requests as requests_lib

_JSON = [(b"content-type", b"application/json")]


def _error(line: str) -> bytes:
  return json.dumps({"error": line}).encode()


def _pin_to_a_free_core(pin_dir: str) -> None:
  """Binds this process to a core that no other process of the server has taken
  (a file per core in ``pin_dir``, created exclusively), before JAX starts: XLA then
  sizes its thread pool to that one core."""
  for core in sorted(os.sched_getaffinity(0)):
    try:
      os.close(os.open(os.path.join(pin_dir, f"core{core}"),
                       os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
      continue
    os.sched_setaffinity(0, {core})
    return


def create_app():
  """The app of one process: the run of ``DNR_INLINE_CHECKPOINT``, compiled for
  every padded batch size up to ``DNR_INLINE_MAX_BATCH`` (64)."""
  pin_dir = os.environ.get("DNR_INLINE_PIN_DIR")
  if pin_dir:
    _pin_to_a_free_core(pin_dir)
  bundle = bundle_lib.load_bundle(os.environ["DNR_INLINE_CHECKPOINT"])
  max_batch = int(os.environ.get("DNR_INLINE_MAX_BATCH", "64"))
  delay_s = float(os.environ.get("DNR_INLINE_DELAY_MS", "1")) / 1000
  limits = requests_lib.RequestLimits.from_bundle(bundle)
  vocab = bundle.vocabulary()
  runner = runner_lib.Runner(bundle.config, (jax.local_devices()[0],))
  params = runner.put_state(jax.tree.map(np.asarray, bundle.params))
  buckets = api.bucket_sizes(max_batch)

  def score(batch):
    arrays, unknown = batches.encode(batch, vocab, limits)
    size = next(b for b in buckets if b >= len(batch))
    pad = size - len(batch)
    padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              if pad else v for k, v in arrays.items()}
    logits = np.asarray(runner.score_params(params, padded))[:len(batch)]
    return batches.replies(batch, logits, arrays["mask"], unknown)

  warm = requests_lib.CheckedRequest(user_id="", item_ids=["?"], scores=[0.5],
                                     history=[], user_features={}, item_features={})
  for b in buckets:
    score([warm] * b)
  gc.collect()
  gc.freeze()

  pending = []          # (checked request, future of its reply bytes)
  timer = [None]        # the pending batch's flush, from its oldest request's arrival

  def flush():
    timer[0] = None
    while pending:
      take = pending[:max_batch]
      del pending[:max_batch]
      try:
        out = score([c for c, _ in take])
      except Exception as e:  # pylint: disable=broad-except
        for _, f in take:
          f.set_exception(e)
        continue
      for (_, f), reply in zip(take, out):
        try:
          f.set_result(orjson.dumps(reply))
        except TypeError:
          f.set_result(json.dumps(reply, separators=(",", ":")).encode())

  async def reply(send, status, body):
    await send({"type": "http.response.start", "status": status, "headers": _JSON + [
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

  async def app(scope, receive, send):
    if scope["type"] == "lifespan":
      while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
          return
    if scope["path"] == "/ready":
      await reply(send, 200, b'{"pid":%d}' % os.getpid())
      return
    if scope["path"] != requests_lib.PATH or scope["method"] != "POST":
      await reply(send, 404, _error("path: not found"))
      return
    chunks = []
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      chunks.append(message.get("body", b""))
      if not message.get("more_body", False):
        break
    body = b"".join(chunks)
    try:
      (checked,) = endpoint.read_body(
          body, lambda value: [requests_lib.check_request(value, limits)])
    except requests_lib.RequestError as e:
      await reply(send, 400, _error(str(e)))
      return
    except ValueError as e:
      await reply(send, 400, _error(f"body: malformed JSON ({e})"))
      return
    except RecursionError:
      await reply(send, 400, _error("body: malformed JSON (nested too deeply)"))
      return
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    pending.append((checked, future))
    if len(pending) >= max_batch:
      if timer[0] is not None:
        timer[0].cancel()
      flush()
    elif timer[0] is None:
      timer[0] = loop.call_later(delay_s, flush) if delay_s else loop.call_soon(flush)
    try:
      out = await future
    except Exception:  # pylint: disable=broad-except
      await reply(send, 500, _error("request: the reranker failed on this batch"))
      return
    await reply(send, 200, out)

  return app
