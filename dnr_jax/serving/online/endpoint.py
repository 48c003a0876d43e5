"""``POST /rerank`` (and ``/rerank_lists``) as a plain ASGI handler in front of
LitServe's FastAPI app.

Under load the request rate is set by two single-threaded stages taking turns: the
HTTP process's event loop and the inference worker's batch loop
(``docs/serving_tuning.md``). In the HTTP process, FastAPI's routing,
dependency solving and pydantic body handling around LitServe's endpoint took more
of the loop's time than reading, checking and queueing the request did. So
``RerankEndpoint`` answers ``POST /rerank`` itself, as the outermost of the app's
middlewares: it reads the body, checks it (``requests.check_request``), puts the
``CheckedRequest`` on LitServe's request queue and waits on LitServe's response
buffer exactly as LitServe's own request handler does, then sends the reply the
worker encoded. Dynamic batching, the inference worker, the reply transport and the
processes stay LitServe's; LitServe's own route for the path is never reached.

``POST /rerank_lists`` takes several lists in one request (``requests.check_lists``):
each is queued as a request of its own, so the worker batches and scores it exactly
as if it had come alone, and the reply gathers the worker's replies in the body's
order, ``{"results": [...]}``. Only the HTTP work is shared.

It also counts and times every request to the two paths (``metrics``).
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
import orjson
from starlette.exceptions import HTTPException

from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online import requests as requests_lib

PATH = requests_lib.PATH
LISTS_PATH = requests_lib.LISTS_PATH
_JSON = [(b"content-type", b"application/json")]
# The largest ``/rerank_lists`` body: the per-list room (``max_body``, which allows a
# history of ``requests.MAX_HISTORY`` ids) times the lists would reach gigabytes,
# buffered and parsed on the HTTP process's only event loop. 32 MiB is half a
# megabyte per list for 64 lists; one list alone may still send ``max_body``.
MAX_LISTS_BODY = 32 << 20


def read_body(body: bytes, check):
  """``check`` of the JSON value of ``body``, exactly as with ``json.loads``.

  orjson parses a request's body several times faster than the standard library, but
  refuses some bodies the standard library reads (``NaN``, ``1e400``, a lone
  surrogate, a byte-order mark) and reads an integer past 64 bits as a float. So a
  body orjson refuses, one whose orjson reading fails ``check`` (an id that came
  out a float, say), and one with a ``list_id`` that is not a string or an integer
  (echoed back, it must be what was sent) are read again by the standard library,
  whose reading (or error) is then the answer.

  Returns:
    ``check(value)``: the checked requests.

  Raises:
    ValueError: malformed JSON (``json.JSONDecodeError``, or ``UnicodeDecodeError``
      for bytes that are not text); RecursionError: nested too deeply;
      ``requests.RequestError`` (a ``ValueError``): what ``check`` raised.
  """
  try:
    checked = check(orjson.loads(body))
    if all(type(c.list_id) in _PLAIN for c in checked):
      return checked
  except (orjson.JSONDecodeError, requests_lib.RequestError):
    pass
  return check(json.loads(body))


_PLAIN = (str, int, type(None))


def _error_body(line: str) -> bytes:
  return json.dumps({"error": line}).encode()


class RerankEndpoint:
  """ASGI middleware: answers ``POST /rerank`` and ``POST /rerank_lists``, counts and
  times both paths.

  Args:
    app: the ASGI app below (FastAPI's, with LitServe's routes).
    server: the ``litserve.LitServer``: its request queue for ``PATH``, its
      response buffer, and ``app.response_queue_id`` (set in each HTTP process
      before it is forked).
    limits: what a request may hold (``requests.RequestLimits``).
    max_body: the largest body of one list read, in bytes (413 past it, before
      parsing); for ``/rerank_lists``, ``max_lists`` times it, at most
      ``MAX_LISTS_BODY`` (but never less than ``max_body``).
    max_lists: the most lists a ``/rerank_lists`` request may hold.
    timeout_s: a request the worker has not answered within this gets 504 (whether
      it waited in the queue, where the worker itself answers 504 after LitServe's
      ``timeout``, or in a batch that never finished).
  """

  def __init__(self, app, *, server, limits: requests_lib.RequestLimits,
               max_body: int, timeout_s: float, max_lists: int = 64):
    self.app, self.server, self.limits, self.max_body = app, server, limits, max_body
    self.max_lists = max_lists
    self._children = {}
    self.timeout_s = timeout_s
    # A uid only has to be unique among this HTTP process's requests in flight (the
    # replies come back to the process that sent the request); LitServe's uuid4
    # read the OS's random source once per request.
    self._uids = map(str, itertools.count())

  async def __call__(self, scope, receive, send):
    path = scope["path"] if scope["type"] == "http" else None
    if path != PATH and path != LISTS_PATH:
      await self.app(scope, receive, send)
      return
    t0 = time.perf_counter()
    status = 499   # nginx's "client closed request": cancelled before any reply
    try:
      if scope["method"] == "POST":
        status = await self._answer(receive, send, many=path == LISTS_PATH)
      elif path == LISTS_PATH:   # no route of the app's: 405 here, not its 404
        status = await _reply(send, 405, _error_body(
            f"request: {LISTS_PATH} takes POST, not {scope['method']}"),
            extra=[(b"allow", b"POST")])
      else:
        status = await self._pass(scope, receive, send)
    except Exception:
      status = 500   # what Starlette's error middleware outside answers
      raise
    finally:
      requests, errors, latency = self._metrics(path, status)
      requests.inc()
      if errors is not None:
        errors.inc()
      latency.observe(time.perf_counter() - t0)

  def _metrics(self, path: str, status: int):
    """The metric children of a path and status, labelled once rather than per
    request (``labels`` is a locked lookup per call), this process's
    (``metrics.get``: an endpoint made before a fork must not write to its
    parent's)."""
    key = (os.getpid(), path, status)
    children = self._children.get(key)
    if children is None:
      m, code = metrics_lib.get(), str(status)
      children = self._children[key] = (
          m.requests.labels(path=path, code=code),
          m.errors.labels(path=path, code=code) if status >= 400 else None,
          m.latency.labels(path=path))
    return children

  async def _pass(self, scope, receive, send) -> int:
    """Another method on the path: the app's answer (405), its status kept."""
    seen = [499]   # nginx's "client closed request": no reply was started

    async def send_status(message):
      if message["type"] == "http.response.start":
        seen[0] = message["status"]
      await send(message)

    await self.app(scope, receive, send_status)
    return seen[0]

  async def _answer(self, receive, send, many: bool = False) -> int:
    max_body = (max(self.max_body, min(self.max_body * self.max_lists, MAX_LISTS_BODY))
                if many else self.max_body)
    body = await self._body(receive, max_body)
    if isinstance(body, int):
      # After a 413 the rest of the body is still on the connection: close it.
      what = (f" (the most a request of up to {self.max_lists} lists may send)"
              if many else "")
      return body if body == 499 else await _reply(
          send, 413, _error_body(f"body: larger than {max_body} bytes{what}"),
          close=True)
    if not body.strip():
      return await _reply(send, 400, _error_body(
          'body: missing (send {"lists": [...]} as a JSON object)' if many else
          "body: missing (send one list as a JSON object)"))
    try:
      checked = read_body(body, self._check_lists if many else self._check_one)
    except requests_lib.RequestError as e:
      return await _reply(send, 400, _error_body(str(e)))
    except ValueError as e:   # JSONDecodeError, and UnicodeDecodeError for bad bytes
      return await _reply(send, 400, _error_body(f"body: malformed JSON ({e})"))
    except RecursionError:
      return await _reply(send, 400, _error_body("body: malformed JSON (nested too "
                                                 "deeply)"))
    answers = await self._submit(checked)
    replies = []
    for i, answer in enumerate(answers):
      where = f"lists[{i}]: " if many else ""
      if answer is None:
        return await _reply(send, 504, _error_body(
            f"{where}request: no reply from the reranker within {self.timeout_s:g}s "
            "(request_timeout_s)"))
      response, status = answer
      if status != LitAPIStatus.OK:
        code, line = _failure(response)
        return await _reply(send, code, _error_body(where + line))
      replies.append(response)
    if not many:
      return await _reply(send, 200, replies[0])
    return await _reply(send, 200, b'{"results":[' + b",".join(replies) + b"]}")

  def _check_one(self, data) -> list:
    return [requests_lib.check_request(data, self.limits)]

  def _check_lists(self, data) -> list:
    return requests_lib.check_lists(data, self.limits, self.max_lists)

  async def _body(self, receive, max_body: int):
    """The request's body, or 413 (too large) or 499 (the client went away)."""
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return 499
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > max_body:
        return 413
      chunks.append(chunk)
      if not message.get("more_body", False):
        return b"".join(chunks)

  async def _submit(self, checked: list) -> list:
    """Queues checked requests for the worker, each on its own; their ``(response,
    status)``, each None if none came within ``timeout_s``."""
    server = self.server
    queue = server.litapi_request_queues[PATH]
    uids = [next(self._uids) for _ in checked]
    events = [asyncio.Event() for _ in checked]
    items = [ResponseBufferItem(event=e) for e in events]
    server.response_buffer.update(zip(uids, items))

    def expire():
      for e in events:
        e.set()

    # A timer rather than asyncio.wait_for, which would make a task per request.
    timer = asyncio.get_running_loop().call_later(self.timeout_s, expire)
    try:
      now = time.monotonic()
      for uid, one in zip(uids, checked):
        queue.put((server.app.response_queue_id, uid, now, one))
      for e in events:
        await e.wait()
      return [item.response for item in items]
    finally:
      timer.cancel()
      for uid in uids:
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


async def _reply(send, status: int, body: bytes, close: bool = False,
                 extra=()) -> int:
  headers = _JSON + [(b"content-length", str(len(body)).encode()), *extra]
  if close:
    headers.append((b"connection", b"close"))
  await send({"type": "http.response.start", "status": status, "headers": headers})
  await send({"type": "http.response.body", "body": body})
  return status
