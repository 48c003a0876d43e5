"""The online service's request on Triton Inference Server, with no Python per request.

``experiments.serve_triton`` serves what ``experiments.serve`` serves of one list
per request (the same body, checks, one-line errors, vocabulary and reply), with
Triton's C++ HTTP front end and dynamic batcher in front of a C++ backend:

* ``backend.cc``: the ``dnr`` backend (RapidJSON, ONNX Runtime's C API);
* ``sources``: the headers it is compiled against (Triton's, ONNX Runtime's);
* ``build``: compiles it once into a cache;
* ``repository``: the model repository (the ONNX reranker, vocabulary, limits);
* ``server``: Triton 2.51's ``tritonserver``, from the nvidia-pytriton wheel;
* ``service``: all of the above from a trained run, and the server run;
* ``client``: a request and its reply on Triton's HTTP protocol.

Needs the serve extra, a C++17 compiler and RapidJSON's headers
(docs/serving_triton.md).
"""
