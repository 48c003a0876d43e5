"""``POST /rerank`` as a plain ASGI handler in front of LitServe's FastAPI app.

Under load the request rate is set by two single-threaded stages taking turns: the
HTTP process's event loop and the inference worker's batch loop
(``docs/serving.md``, "Performance"). In the HTTP process, FastAPI's routing,
dependency solving and pydantic body handling around LitServe's endpoint took more
of the loop's time than reading, checking and queueing the request did. So
``RerankEndpoint`` answers ``POST /rerank`` itself, as the outermost of the app's
middlewares: it reads the body, checks it (``requests.check_request``), puts the
``CheckedRequest`` on LitServe's request queue and waits on LitServe's response
buffer exactly as LitServe's own request handler does, then sends the reply the
worker encoded. Dynamic batching, the inference worker, the reply transport and the
processes stay LitServe's; LitServe's own route for the path is never reached.

It also counts and times every request to the path (``metrics``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import time

from absl import logging
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.exceptions import HTTPException

from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online import requests as requests_lib

PATH = requests_lib.PATH
_JSON = [(b"content-type", b"application/json")]


def _error_body(line: str) -> bytes:
  return json.dumps({"error": line}).encode()


class RerankEndpoint:
  """ASGI middleware: answers ``POST /rerank``, counts and times the path.

  Args:
    app: the ASGI app below (FastAPI's, with LitServe's routes).
    server: the ``litserve.LitServer``: its request queue for ``PATH``, its
      response buffer, and ``app.response_queue_id`` (set in each HTTP process
      before it is forked).
    limits: what a request may hold (``requests.RequestLimits``).
    max_body: the largest body read, in bytes (413 past it, before parsing).
    timeout_s: a request the worker has not answered within this gets 504 (whether
      it waited in the queue, where the worker itself answers 504 after LitServe's
      ``timeout``, or in a batch that never finished).
  """

  def __init__(self, app, *, server, limits: requests_lib.RequestLimits,
               max_body: int, timeout_s: float):
    self.app, self.server, self.limits, self.max_body = app, server, limits, max_body
    self.timeout_s = timeout_s
    # A uid only has to be unique among this HTTP process's requests in flight (the
    # replies come back to the process that sent the request); LitServe's uuid4
    # read the OS's random source once per request.
    self._uids = map(str, itertools.count())

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["path"] != PATH:
      await self.app(scope, receive, send)
      return
    t0 = time.perf_counter()
    status = 499   # nginx's "client closed request": cancelled before any reply
    try:
      if scope["method"] == "POST":
        status = await self._answer(receive, send)
      else:
        status = await self._pass(scope, receive, send)
    except Exception:
      status = 500   # what Starlette's error middleware outside answers
      raise
    finally:
      m = metrics_lib.get()
      code = str(status)
      m.requests.labels(code=code).inc()
      if status >= 400:
        m.errors.labels(code=code).inc()
      m.latency.observe(time.perf_counter() - t0)

  async def _pass(self, scope, receive, send) -> int:
    """Another method on the path: the app's answer (405), its status kept."""
    seen = [499]   # nginx's "client closed request": no reply was started

    async def send_status(message):
      if message["type"] == "http.response.start":
        seen[0] = message["status"]
      await send(message)

    await self.app(scope, receive, send_status)
    return seen[0]

  async def _answer(self, receive, send) -> int:
    body = await self._body(receive)
    if isinstance(body, int):
      # After a 413 the rest of the body is still on the connection: close it.
      return body if body == 499 else await _reply(
          send, 413, _error_body(f"body: larger than {self.max_body} bytes"),
          close=True)
    if not body.strip():
      return await _reply(send, 400, _error_body(
          "body: missing (send one list as a JSON object)"))
    try:
      data = json.loads(body)
    except ValueError as e:   # JSONDecodeError, and UnicodeDecodeError for bad bytes
      return await _reply(send, 400, _error_body(f"body: malformed JSON ({e})"))
    except RecursionError:
      return await _reply(send, 400, _error_body("body: malformed JSON (nested too "
                                                 "deeply)"))
    try:
      checked = requests_lib.check_request(data, self.limits)
    except requests_lib.RequestError as e:
      return await _reply(send, 400, _error_body(str(e)))
    answer = await self._submit(checked)
    if answer is None:
      return await _reply(send, 504, _error_body(
          f"request: no reply from the reranker within {self.timeout_s:g}s "
          "(request_timeout_s)"))
    response, status = answer
    if status == LitAPIStatus.OK:
      return await _reply(send, 200, response)
    code, line = _failure(response)
    return await _reply(send, code, _error_body(line))

  async def _body(self, receive):
    """The request's body, or 413 (too large) or 499 (the client went away)."""
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return 499
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > self.max_body:
        return 413
      chunks.append(chunk)
      if not message.get("more_body", False):
        return b"".join(chunks)

  async def _submit(self, checked):
    """Queues one checked request for the worker; its ``(response, status)``, or
    None if none came within ``timeout_s``."""
    server = self.server
    uid = next(self._uids)
    event = asyncio.Event()
    item = server.response_buffer[uid] = ResponseBufferItem(event=event)
    # A timer rather than asyncio.wait_for, which would make a task per request.
    timer = asyncio.get_running_loop().call_later(self.timeout_s, event.set)
    try:
      server.litapi_request_queues[PATH].put(
          (server.app.response_queue_id, uid, time.monotonic(), checked))
      await event.wait()
      return item.response
    finally:
      timer.cancel()
      server.response_buffer.pop(uid, None)


def _failure(response) -> tuple[int, str]:
  """The status and one line of a request the worker failed (LitServe's error
  replies: an ``HTTPException``, say 504 for a request that waited past the
  timeout, possibly pickled, or the exception that failed the batch)."""
  if isinstance(response, bytes):
    try:
      response = pickle.loads(response)
    except Exception:  # pylint: disable=broad-except
      pass
  if isinstance(response, HTTPException):
    return response.status_code, f"request: {response.detail}"
  logging.error("pid %d: a batch failed in the worker: %r", os.getpid(), response)
  return 500, "request: the reranker failed on this request's batch (the worker's log says why)"


async def _reply(send, status: int, body: bytes, close: bool = False) -> int:
  headers = _JSON + [(b"content-length", str(len(body)).encode())]
  if close:
    headers.append((b"connection", b"close"))
  await send({"type": "http.response.start", "status": status, "headers": headers})
  await send({"type": "http.response.body", "body": body})
  return status
