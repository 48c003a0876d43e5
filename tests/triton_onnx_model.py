"""A Triton Python-backend model that runs the repository's ``model.onnx`` in ONNX
Runtime (not a test file: ``onnx_export_test`` serves it from a real Triton server).

The nvidia-pytriton wheel that brings Triton here has no ONNX Runtime backend; where
that backend cannot be built from source (``benchmarks.triton_onnxruntime_backend``),
this model stands in for it: the config's inputs and output, dims, reshape and
dynamic batching are still Triton's to check and apply; only the graph runs in
Python. A batch of requests is scored in one
``run`` and split back per request.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
import triton_tensors   # benchmarks/triton_tensors.py, copied beside this file


class TritonPythonModel:

  def initialize(self, args):
    triton_tensors.install()
    config = json.loads(args["model_config"])
    self.inputs = [i["name"] for i in config["input"]]
    (self.output,) = [o["name"] for o in config["output"]]
    self.session = ort.InferenceSession(
        os.path.join(args["model_repository"], args["model_version"], "model.onnx"),
        providers=["CPUExecutionProvider"])

  def execute(self, requests):
    arrays = [{name: triton_tensors.array(pb_utils.get_input_tensor_by_name(r, name))
               for name in self.inputs} for r in requests]
    sizes = [len(a[self.inputs[0]]) for a in arrays]
    (out,) = self.session.run([self.output], {
        name: np.concatenate([a[name] for a in arrays]) for name in self.inputs})
    ends = np.cumsum(sizes)
    return [pb_utils.InferenceResponse(output_tensors=[
        triton_tensors.tensor(pb_utils, self.output, out[end - size:end])])
            for size, end in zip(sizes, ends)]
