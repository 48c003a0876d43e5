"""The /rerank ASGI endpoint (serving.online.endpoint) without processes.

A stand-in for LitServe's server holds the request queue and the response buffer; its
"worker" answers each queued request on the event loop as LitServe's reply watcher
would (setting the buffer item's response and event). So every answer the endpoint
gives, and what it counts, is checked in one process: 200 with the worker's bytes,
400 for bad bodies, 413 past the size limit, 499 for a client that left, 504 and 500
from the worker, and other methods passed to the app. The real service over HTTP is
tests/online_service_test.py.
"""

import asyncio
import json
import pickle

import pytest

pytest.importorskip("litserve")

# pylint: disable=g-import-not-at-top
from litserve.utils import LitAPIStatus
from starlette.exceptions import HTTPException

from dnr_jax.serving.online import endpoint
from dnr_jax.serving.online import metrics as metrics_lib
from dnr_jax.serving.online import requests
# pylint: enable=g-import-not-at-top

LIMITS = requests.RequestLimits(list_size=3, history_size=2, max_candidates=4)
GOOD = {"user_id": "u", "item_ids": ["a", "b"], "scores": [0.2, 0.9], "list_id": 7}


class _Counter:
  """Counts by code; ``paths`` by (path, code)."""

  def __init__(self):
    self.counts, self.paths = {}, {}

  def labels(self, path, code):
    self.paths[(path, code)] = self.paths.get((path, code), 0) + 1
    return _Child(self.counts, code)


class _Child:

  def __init__(self, counts, code):
    self.counts, self.code = counts, code

  def inc(self):
    self.counts[self.code] = self.counts.get(self.code, 0) + 1


class _Histogram:

  def __init__(self):
    self.values, self.paths = [], []

  def labels(self, path):
    self.paths.append(path)
    return self

  def observe(self, v):
    self.values.append(v)


class _Metrics:

  def __init__(self):
    self.requests, self.errors, self.latency = _Counter(), _Counter(), _Histogram()


class _Queue:
  """LitServe's request queue; ``answer`` plays the worker and the reply watcher."""

  def __init__(self, server, answer):
    self.server, self.answer, self.items = server, answer, []

  def put(self, item):
    self.items.append(item)
    _, uid, _, checked = item

    def reply():
      entry = self.server.response_buffer[uid]
      entry.response = list(self.answer(checked))
      entry.event.set()

    asyncio.get_running_loop().call_soon(reply)


class _App:

  def __init__(self):
    self.calls = 0

  async def __call__(self, scope, receive, send):
    self.calls += 1
    await send({"type": "http.response.start", "status": 405, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _server(answer, queue_id=0):
  server = type("Server", (), {})()
  server.response_buffer = {}
  server.app = type("App", (), {"response_queue_id": queue_id})()
  server.litapi_request_queues = {requests.PATH: _Queue(server, answer)}
  return server


def _ok(checked):
  return json.dumps({"item_ids": checked.item_ids[::-1]}).encode(), LitAPIStatus.OK


def _call(handler, body, method="POST", path=requests.PATH, chunks=1,
          disconnect=False, headers=None):
  """``(status, parsed body)`` of one request through ``handler``."""
  sent = []
  step = max(1, -(-len(body) // chunks))
  parts = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
  messages = ([{"type": "http.disconnect"}] if disconnect else
              [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
               for i, p in enumerate(parts)])

  async def receive():
    return messages.pop(0)

  async def send(message):
    sent.append(message)

  scope = {"type": "http", "path": path, "method": method}
  asyncio.run(handler(scope, receive, send))
  if not sent:
    return None, None
  if headers is not None:
    headers.update(dict(sent[0]["headers"]))
  status = sent[0]["status"]
  payload = b"".join(m.get("body", b"") for m in sent[1:])
  return status, json.loads(payload) if payload else None


@pytest.fixture
def metrics(monkeypatch):
  m = _Metrics()
  monkeypatch.setattr(metrics_lib, "get", lambda: m)
  return m


def _handler(answer=_ok, max_body=10_000, timeout_s=30.0, queue_id=0, max_lists=64):
  app = _App()
  server = _server(answer, queue_id)
  return endpoint.RerankEndpoint(app, server=server, limits=LIMITS,
                                 max_body=max_body, timeout_s=timeout_s,
                                 max_lists=max_lists), server, app


def test_a_good_request_is_queued_checked_and_gets_the_workers_bytes(metrics):
  handler, server, _ = _handler()
  status, reply = _call(handler, json.dumps(GOOD).encode(), chunks=3)
  assert status == 200 and reply == {"item_ids": ["b", "a"]}
  (queue_id, uid, _, checked), = server.litapi_request_queues[requests.PATH].items
  assert queue_id == 0 and isinstance(checked, requests.CheckedRequest)
  assert checked.item_ids == ["a", "b"] and checked.list_id == 7
  # Answered and forgotten: the buffer holds nothing once the reply is sent.
  assert server.response_buffer == {} and uid
  assert metrics.requests.counts == {"200": 1} and metrics.errors.counts == {}
  assert len(metrics.latency.values) == 1


@pytest.mark.parametrize("body, words", [
    (b"", "body: missing"),
    (b"  ", "body: missing"),
    (b'{"user_id": "u"', "body: malformed JSON"),
    (b"\xff\xfe", "body: malformed JSON"),
    (b"[1, 2]", "body: expected a JSON object"),
    pytest.param(b"[" * 5000, "body: malformed JSON (nested too deeply)",
                 id="nested"),
    (b'{"item_ids": ["a"], "scores": [0.5]}', "user_id: missing"),
    (b'{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}',
     "scores[0]: non-finite score nan"),
])
def test_a_bad_body_gets_400_with_one_line_and_is_never_queued(metrics, body, words):
  handler, server, _ = _handler()
  status, reply = _call(handler, body)
  assert status == 400 and set(reply) == {"error"}
  assert reply["error"].startswith(words) and "\n" not in reply["error"]
  assert server.litapi_request_queues[requests.PATH].items == []
  assert metrics.errors.counts == {"400": 1}


def test_a_body_past_the_limit_gets_413_before_it_is_parsed(metrics):
  handler, server, _ = _handler(max_body=100)
  headers = {}
  status, reply = _call(handler, b"x" * 101, chunks=4, headers=headers)
  assert status == 413 and reply == {"error": "body: larger than 100 bytes"}
  # The rest of the body is still on the connection: it is closed, not kept alive.
  assert headers[b"connection"] == b"close"
  assert server.litapi_request_queues[requests.PATH].items == []
  assert metrics.errors.counts == {"413": 1}


def test_a_client_that_left_is_counted_499_and_sent_nothing(metrics):
  handler, _, _ = _handler()
  assert _call(handler, b"", disconnect=True) == (None, None)
  assert metrics.requests.counts == {"499": 1}


@pytest.mark.parametrize("response, want", [
    (HTTPException(504, "Request timed out"), (504, "request: Request timed out")),
    (pickle.dumps(HTTPException(504, "Request timed out")),
     (504, "request: Request timed out")),
    (RuntimeError("XLA says no"), (500, "request: the reranker failed")),
])
def test_a_request_the_worker_failed_gets_its_status_and_one_line(metrics, response,
                                                                   want):
  handler, server, _ = _handler(lambda checked: (response, LitAPIStatus.ERROR))
  status, reply = _call(handler, json.dumps(GOOD).encode())
  assert status == want[0] and reply["error"].startswith(want[1])
  assert server.response_buffer == {}
  assert metrics.errors.counts == {str(want[0]): 1}


def test_other_methods_and_paths_go_to_the_app(metrics):
  handler, _, app = _handler()
  assert _call(handler, b"", method="GET")[0] == 405
  assert metrics.errors.counts == {"405": 1}
  assert _call(handler, b"", path="/ready", method="GET")[0] == 405
  assert app.calls == 2
  # Only the rerank path is counted.
  assert metrics.requests.counts == {"405": 1}


def test_requests_in_flight_together_get_their_own_replies_in_any_order(metrics):
  # The worker answers only once all of them are queued, last first.
  held = []

  def answer(checked):
    return _ok(checked)

  handler, server, _ = _handler(answer, queue_id=3)
  queue = server.litapi_request_queues[requests.PATH]

  def put(item):
    queue.items.append(item)
    held.append(item)
    if len(held) == 3:
      for _, uid, _, checked in reversed(held):
        entry = server.response_buffer[uid]
        entry.response = list(_ok(checked))
        entry.event.set()

  queue.put = put
  bodies = [dict(GOOD, item_ids=[f"a{i}", f"b{i}"]) for i in range(3)]

  async def all_three():
    sent = [[] for _ in bodies]

    def one(body, out):
      messages = [{"type": "http.request", "body": json.dumps(body).encode()}]

      async def receive():
        return messages.pop(0)

      async def send(message):
        out.append(message)

      return handler({"type": "http", "path": requests.PATH, "method": "POST"},
                     receive, send)

    await asyncio.gather(*(one(b, out) for b, out in zip(bodies, sent)))
    return [json.loads(out[1]["body"]) for out in sent]

  replies = asyncio.run(all_three())
  assert replies == [{"item_ids": [f"b{i}", f"a{i}"]} for i in range(3)]
  assert {item[0] for item in queue.items} == {3}            # this process's replies
  assert len({item[1] for item in queue.items}) == 3         # one uid each
  assert server.response_buffer == {} and metrics.requests.counts == {"200": 3}


def test_a_request_never_answered_gets_504_after_the_timeout(metrics):
  handler, server, _ = _handler(timeout_s=0.05)
  server.litapi_request_queues[requests.PATH].put = lambda item: None   # lost
  status, reply = _call(handler, json.dumps(GOOD).encode())
  assert status == 504 and reply["error"].startswith(
      "request: no reply from the reranker within 0.05s")
  assert server.response_buffer == {} and metrics.errors.counts == {"504": 1}


def test_a_cancelled_request_counts_499_and_a_crash_500(metrics):
  handler, server, _ = _handler(timeout_s=60)
  server.litapi_request_queues[requests.PATH].put = lambda item: None

  async def cancelled():
    messages = [{"type": "http.request", "body": json.dumps(GOOD).encode()}]

    async def receive():
      return messages.pop(0)

    async def send(message):
      raise AssertionError(f"nothing is sent: {message}")

    task = asyncio.ensure_future(handler(
        {"type": "http", "path": requests.PATH, "method": "POST"}, receive, send))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
      await task

  asyncio.run(cancelled())
  assert metrics.requests.counts == {"499": 1} and server.response_buffer == {}

  def crash(item):
    raise OSError("pipe gone")

  server.litapi_request_queues[requests.PATH].put = crash
  with pytest.raises(OSError):
    _call(handler, json.dumps(GOOD).encode())
  assert metrics.requests.counts == {"499": 1, "500": 1}
  assert server.response_buffer == {}


def test_several_lists_are_queued_each_on_its_own_and_answered_in_order(metrics):
  handler, server, _ = _handler()
  lists = [dict(GOOD, item_ids=[f"a{i}", f"b{i}"], list_id=i) for i in range(3)]
  status, reply = _call(handler, json.dumps({"lists": lists}).encode(),
                        path=requests.LISTS_PATH)
  assert status == 200
  assert reply == {"results": [{"item_ids": [f"b{i}", f"a{i}"]} for i in range(3)]}
  items = server.litapi_request_queues[requests.PATH].items
  assert [checked.list_id for _, _, _, checked in items] == [0, 1, 2]
  assert len({uid for _, uid, _, _ in items}) == 3 and server.response_buffer == {}
  assert metrics.requests.paths == {(requests.LISTS_PATH, "200"): 1}
  assert metrics.latency.paths == [requests.LISTS_PATH]


@pytest.mark.parametrize("body, words", [
    ({"lists": [GOOD, dict(GOOD, scores=[0.2, float("nan")])]},
     "lists[1].scores[1]: non-finite score nan"),
    ({"lists": [GOOD, [1]]}, "lists[1]: expected a JSON object"),
    ({"lists": []}, "lists: expected a non-empty list"),
    ({"lists": [GOOD] * 5}, "lists: 5 lists, more than the 4"),
    ({"lists": [GOOD], "user_id": "u"}, "user_id: unknown field"),
    (GOOD, 'body: one list, where this path takes {"lists": [...]} (post one '
           "list to /rerank)"),
])
def test_one_bad_list_refuses_the_request_and_queues_none(metrics, body, words):
  handler, server, _ = _handler(max_lists=4)
  status, reply = _call(handler, json.dumps(body).encode(), path=requests.LISTS_PATH)
  assert status == 400 and reply["error"].startswith(words), reply
  assert server.litapi_request_queues[requests.PATH].items == []
  assert metrics.errors.paths == {(requests.LISTS_PATH, "400"): 1}


def test_a_list_the_worker_failed_fails_its_request_naming_the_list(metrics):
  def answer(checked):
    if checked.list_id == 1:
      return HTTPException(504, "Request timed out"), LitAPIStatus.ERROR
    return _ok(checked)

  handler, server, _ = _handler(answer)
  lists = [dict(GOOD, list_id=i) for i in range(3)]
  status, reply = _call(handler, json.dumps({"lists": lists}).encode(),
                        path=requests.LISTS_PATH)
  assert status == 504 and reply["error"] == "lists[1]: request: Request timed out"
  assert server.response_buffer == {}


def test_the_body_limit_of_several_lists_is_per_list_up_to_a_cap(metrics,
                                                                 monkeypatch):
  handler, _, _ = _handler(max_body=100, max_lists=3)
  status, reply = _call(handler, b" " * 301, path=requests.LISTS_PATH)
  assert status == 413 and reply == {"error": "body: larger than 300 bytes (the "
                                     "most a request of up to 3 lists may send)"}
  status, _ = _call(handler, b" " * 300, path=requests.LISTS_PATH)
  assert status == 400
  # The cap: never past MAX_LISTS_BODY, never below one list's room.
  monkeypatch.setattr(endpoint, "MAX_LISTS_BODY", 250)
  assert _call(handler, b" " * 251, path=requests.LISTS_PATH)[0] == 413
  assert _call(handler, b" " * 250, path=requests.LISTS_PATH)[0] == 400
  monkeypatch.setattr(endpoint, "MAX_LISTS_BODY", 50)
  assert _call(handler, b" " * 100, path=requests.LISTS_PATH)[0] == 400


def test_another_method_on_the_lists_path_gets_405(metrics):
  handler, _, app = _handler()
  headers = {}
  status, reply = _call(handler, b"", method="GET", path=requests.LISTS_PATH,
                        headers=headers)
  assert status == 405 and headers[b"allow"] == b"POST" and app.calls == 0
  assert reply == {"error": "request: /rerank_lists takes POST, not GET"}
  assert metrics.errors.paths == {(requests.LISTS_PATH, "405"): 1}


def test_a_list_never_answered_fails_its_request_after_the_timeout(metrics):
  handler, server, _ = _handler(timeout_s=0.05)
  queue = server.litapi_request_queues[requests.PATH]
  answer = queue.put

  def put(item):   # the second list is lost
    if item[3].list_id == 1:
      queue.items.append(item)
    else:
      answer(item)

  queue.put = put
  lists = [dict(GOOD, list_id=i) for i in range(3)]
  status, reply = _call(handler, json.dumps({"lists": lists}).encode(),
                        path=requests.LISTS_PATH)
  assert status == 504 and reply["error"].startswith(
      "lists[1]: request: no reply from the reranker within 0.05s")
  assert server.response_buffer == {}


@pytest.mark.parametrize("text, field, want", [
    # orjson reads an integer past 64 bits as a float; the standard library's reading
    # (an integer id, its digits as the text) must win.
    ('{"user_id": 123456789012345678901234567890, "item_ids": ["a"], '
     '"scores": [0.5]}', "user_id", "123456789012345678901234567890"),
    ('{"user_id": "u", "item_ids": [-99999999999999999999, "b"], '
     '"scores": [0.5, 0.5]}', "raw_item_ids", [-99999999999999999999, "b"]),
    # Echoed back: as the standard library reads it.
    ('{"user_id": "u", "item_ids": ["a"], "scores": [0.5], '
     '"list_id": 123456789012345678901234567890}', "list_id",
     123456789012345678901234567890),
    ('{"user_id": "u", "item_ids": ["a"], "scores": [0.5], "list_id": [1, {"x": 2}]}',
     "list_id", [1, {"x": 2}]),
    ('\ufeff{"user_id": "u", "item_ids": ["a"], "scores": [0.5]}', "user_id", "u"),
])
def test_a_body_is_read_as_the_standard_librarys_json_reads_it(metrics, text, field,
                                                              want):
  # (Bodies orjson refuses but the checks then refuse too: below.)
  handler, server, _ = _handler()
  body = text.encode("utf-8")
  status, _ = _call(handler, body)
  assert status == 200
  (_, _, _, checked), = server.litapi_request_queues[requests.PATH].items
  got = getattr(checked, field)
  assert got == want and type(got) is type(want)   # pylint: disable=unidiomatic-typecheck
  assert endpoint.read_body(body, lambda d: [requests.check_request(d, LIMITS)]) == [
      requests.check_request(json.loads(body), LIMITS)]


@pytest.mark.parametrize("text, words", [
    ('{"user_id": "u", "item_ids": ["a"], "scores": [1e400]}',
     "scores[0]: non-finite score inf"),
    ('{"user_id": "u", "item_ids": ["a"], "scores": [NaN]}',
     "scores[0]: non-finite score nan"),
    ('{"user_id": "\\ud800", "item_ids": ["a"], "scores": [0.5]}',
     "user_id: not valid Unicode"),
    ('{"user_id": "u", "item_ids": ["a"], "scores": [1%s]}' % ("0" * 400),
     "scores[0]: non-finite score (an integer of 401 digits)"),
])
def test_a_body_orjson_refuses_gets_the_standard_librarys_answer(metrics, text, words):
  handler, server, _ = _handler()
  status, reply = _call(handler, text.encode())
  assert status == 400 and reply["error"].startswith(words), reply
  assert server.litapi_request_queues[requests.PATH].items == []
