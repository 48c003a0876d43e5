"""Prototype, not part of the service: the reranker behind mosec 0.9.8.

mosec's HTTP server and dynamic batcher are Rust; Python workers sit behind Unix
sockets. Configured from the environment (``run.py`` sets it):

* ``DNR_CHECKPOINT``: the run to serve.
* ``DNR_STAGES=2``: a ``Check`` stage (no batching) reads and checks each request
  (``requests.check_request``, the service's own checks) and answers a bad one with
  400 on its own; the ``Score`` stage batches the checked requests. mosec gives a
  whole batch one status, so this is the only arrangement in which a bad request
  fails alone, as the service's contract requires.
* ``DNR_STAGES=1``: one batched stage that checks and scores: cheaper, but a bad
  request fails every request batched with it (an upper bound, not a service).
* ``DNR_STAGES=score_then_status``: the batched stage first, checking each body
  and scoring the good ones; a bad one travels on as its error. A second,
  unbatched stage gives each request its own status: 400 with the error, or the
  reply as it is. A bad request fails alone, as in ``DNR_STAGES=2``, but the
  per-request stage only passes bytes on (no JSON, no checks).
* ``DNR_STATUS_WORKERS``: that second stage's processes.
* ``DNR_SCORE_WORKERS``, ``DNR_MAX_BATCH``, ``DNR_WAIT_MS``: the batched stage's
  processes, largest batch, and batching window (mosec's ``max_wait_time``).

Run: ``python mosec_app.py --port PORT --address 127.0.0.1``; ``POST /inference``
takes the service's ``/rerank`` body and answers its reply.
"""

import gc
import os
import pickle

import numpy as np
import orjson
from mosec import ClientError, Server, Worker

CHECKPOINT = os.environ.get("DNR_CHECKPOINT", "")


def _bundle_and_limits():
  from dnr_jax.serving import bundle as bundle_lib
  from dnr_jax.serving.online import requests as requests_lib
  bundle = bundle_lib.load_bundle(CHECKPOINT)
  return bundle, requests_lib.RequestLimits.from_bundle(bundle, None)


class _Checks:
  """``requests.check_request`` of a raw body, a bad one as mosec's 400."""

  def __init__(self):
    from dnr_jax.serving.online import endpoint
    from dnr_jax.serving.online import requests as requests_lib
    self.read_body, self.requests = endpoint.read_body, requests_lib
    _, self.limits = _bundle_and_limits()

  def __call__(self, body):
    try:
      return self.read_body(bytes(body), lambda d: [
          self.requests.check_request(d, self.limits)])[0]
    except self.requests.RequestError as e:
      raise ClientError(str(e)) from None
    except (ValueError, RecursionError) as e:
      raise ClientError(f"body: malformed JSON ({e})") from None


class Check(Worker):
  """Stage 1 of 2: one request at a time, checked; on to ``Score`` pickled."""

  def __init__(self):
    super().__init__()
    self.check = _Checks()

  def deserialize(self, data):
    return data

  def forward(self, data):
    return self.check(data)

  def serialize_ipc(self, data):
    return pickle.dumps(data, protocol=5)


class _Refused:
  """A body that failed its checks, carried to the status stage."""

  def __init__(self, message):
    self.message = message


class Score(Worker):
  """The batched stage: the service's worker's scoring (``api.RerankAPI._score``'s
  steps), each reply as JSON bytes."""

  def __init__(self):
    super().__init__()
    import jax
    from dnr_jax.runtime import runner as runner_lib
    from dnr_jax.serving.online import api, batches
    from dnr_jax.serving.online import requests as requests_lib
    self.batches = batches
    bundle, self.limits = _bundle_and_limits()
    self.vocab = bundle.vocabulary()
    self.runner = runner_lib.Runner(bundle.config, (jax.local_devices()[0],))
    self.params = self.runner.put_state(jax.tree.map(np.asarray, bundle.params))
    self.buckets = api.bucket_sizes(int(os.environ.get("DNR_MAX_BATCH", "64")))
    stages = os.environ.get("DNR_STAGES")
    self.check = _Checks() if stages in ("1", "score_then_status") else None
    self.carry_errors = stages == "score_then_status"
    warm = requests_lib.CheckedRequest(user_id="", item_ids=["?"], scores=[0.5],
                                       history=[], user_features={}, item_features={})
    for b in self.buckets:
      self.forward([warm] * b)
    gc.collect()
    gc.freeze()

  def deserialize(self, data):   # when this stage takes the body
    if not self.carry_errors:
      return self.check(data)
    try:
      return self.check(data)
    except ClientError as e:
      return _Refused(str(e))

  def deserialize_ipc(self, data):
    return pickle.loads(data)

  def forward(self, data):
    if self.carry_errors:
      good = [d for d in data if not isinstance(d, _Refused)]
      replies = iter(self._score(good) if good else ())
      return [d if isinstance(d, _Refused) else next(replies) for d in data]
    return self._score(data)

  def _score(self, data):
    arrays, unknown = self.batches.encode(data, self.vocab, self.limits)
    size = next(b for b in self.buckets if b >= len(data))
    pad = size - len(data)
    padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              if pad else v for k, v in arrays.items()}
    logits = np.asarray(self.runner.score_params(self.params, padded))[:len(data)]
    return self.batches.replies(data, logits, arrays["mask"], unknown)

  def serialize(self, data):
    return orjson.dumps(data)

  def serialize_ipc(self, data):   # with DNR_STAGES=score_then_status
    if isinstance(data, _Refused):
      return b"\x01" + data.message.encode()
    return b"\x00" + orjson.dumps(data)


class Status(Worker):
  """The last stage with DNR_STAGES=score_then_status: one request at a time, so
  each gets its own status."""

  def deserialize_ipc(self, data):
    return data

  def forward(self, data):
    if data[0] == 1:
      raise ClientError(bytes(data[1:]).decode())
    return data[1:]

  def serialize(self, data):
    return bytes(data)


if __name__ == "__main__":
  server = Server()
  stages = os.environ.get("DNR_STAGES", "2")
  if stages == "2":
    server.append_worker(Check, num=1, max_batch_size=1)
  server.append_worker(Score, num=int(os.environ.get("DNR_SCORE_WORKERS", "1")),
                       max_batch_size=int(os.environ.get("DNR_MAX_BATCH", "64")),
                       max_wait_time=int(os.environ.get("DNR_WAIT_MS", "1")),
                       timeout=600)
  if stages == "score_then_status":
    server.append_worker(Status, num=int(os.environ.get("DNR_STATUS_WORKERS", "1")),
                         max_batch_size=1)
  server.run()
