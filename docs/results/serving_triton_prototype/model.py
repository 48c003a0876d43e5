"""Prototype, not part of the service: the reranker as a Triton Python-backend model.

Triton Inference Server's HTTP front end and dynamic batcher are C++; this model
runs in the Python backend's stub process and gets each batch of requests in one
``execute`` call. Each request carries the service's ``/rerank`` body as raw bytes
(input ``request``, UINT8, ragged), sent with Triton's binary tensor extension; the
reply's ``reply`` output is the service's JSON reply. A bad request gets its own
error response (``TritonError.INVALID_ARG``: HTTP 400) and the others in its batch
are answered as usual, as the service's contract requires.

Tensors cross by DLPack (``triton_tensors``), not ``Tensor.as_numpy``: the stub
that nvidia-pytriton 0.6.0 carries builds numpy arrays with the NumPy 1 ABI, and
under NumPy 2 (which JAX needs) they come out with a stride of 0.

Configured by the model's ``parameters`` (``run.py`` writes them): ``checkpoint``
(the run served) and ``max_batch`` (the largest batch, as in ``config.pbtxt``).
"""

import gc
import json

import numpy as np
import orjson
import triton_python_backend_utils as pb_utils
import triton_tensors   # benchmarks/triton_tensors.py, copied beside this file


class TritonPythonModel:

  def initialize(self, args):
    triton_tensors.install()
    import jax
    from dnr_jax.runtime import runner as runner_lib
    from dnr_jax.serving import bundle as bundle_lib
    from dnr_jax.serving.online import api, batches, endpoint
    from dnr_jax.serving.online import requests as requests_lib
    params = {k: v["string_value"] for k, v in
              json.loads(args["model_config"])["parameters"].items()}
    self.batches, self.requests, self.read_body = batches, requests_lib, endpoint.read_body
    bundle = bundle_lib.load_bundle(params["checkpoint"])
    self.limits = requests_lib.RequestLimits.from_bundle(bundle, None)
    self.vocab = bundle.vocabulary()
    self.runner = runner_lib.Runner(bundle.config, (jax.local_devices()[0],))
    self.params = self.runner.put_state(jax.tree.map(np.asarray, bundle.params))
    self.buckets = api.bucket_sizes(int(params["max_batch"]))
    warm = requests_lib.CheckedRequest(user_id="", item_ids=["?"], scores=[0.5],
                                       history=[], user_features={}, item_features={})
    for b in self.buckets:
      self._score([warm] * b)
    gc.collect()
    gc.freeze()

  def _check(self, body):
    try:
      return self.read_body(body, lambda d: [
          self.requests.check_request(d, self.limits)])[0]
    except self.requests.RequestError as e:
      return pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
    except (ValueError, RecursionError) as e:
      return pb_utils.TritonError(f"body: malformed JSON ({e})",
                                  pb_utils.TritonError.INVALID_ARG)

  def _score(self, checked):
    arrays, unknown = self.batches.encode(checked, self.vocab, self.limits)
    size = next(b for b in self.buckets if b >= len(checked))
    pad = size - len(checked)
    padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              if pad else v for k, v in arrays.items()}
    logits = np.asarray(self.runner.score_params(self.params, padded))[:len(checked)]
    return self.batches.replies(checked, logits, arrays["mask"], unknown)

  def execute(self, requests):
    checked = [self._check(triton_tensors.array(
        pb_utils.get_input_tensor_by_name(r, "request")).tobytes()) for r in requests]
    good = [c for c in checked if not isinstance(c, pb_utils.TritonError)]
    replies = iter(self._score(good) if good else ())
    out = []
    for c in checked:
      if isinstance(c, pb_utils.TritonError):
        out.append(pb_utils.InferenceResponse(error=c))
      else:
        reply = np.frombuffer(orjson.dumps(next(replies)), np.uint8)[None]
        out.append(pb_utils.InferenceResponse(
            output_tensors=[triton_tensors.tensor(pb_utils, "reply", reply)]))
    return out
