"""A request to the raw-ids Triton model, and its reply, on Triton's HTTP protocol.

A request carries one service body (``serving/online/requests.py``'s JSON, one
list in raw ids) as the UINT8 tensor ``request``, in Triton's binary tensor
extension: a JSON header, padded to ``HEADER_BYTES`` so one set of HTTP headers
(``HEADERS``) serves every body, then the body's bytes. The reply's ``reply``
tensor is the service's JSON reply, after a header of the length that the
response's ``Inference-Header-Content-Length`` gives. A refused request gets a 400
whose JSON is ``{"error": "<field>: <problem>"}``, the service's line.
"""

from __future__ import annotations

import json
from typing import Mapping

HEADER_BYTES = 256
HEADERS = {"Inference-Header-Content-Length": str(HEADER_BYTES),
           "Content-Type": "application/octet-stream"}


def request_body(body: bytes) -> bytes:
  """``body`` (a service request's JSON) as the ``request`` tensor of a
  binary-extension request, to be sent with ``HEADERS``."""
  header = json.dumps({
      "inputs": [{"name": "request", "shape": [1, len(body)], "datatype": "UINT8",
                  "parameters": {"binary_data_size": len(body)}}],
      "outputs": [{"name": "reply", "parameters": {"binary_data": True}}]}).encode()
  if len(header) > HEADER_BYTES:
    raise ValueError(f"a request's header of {len(header)} bytes")
  return header.ljust(HEADER_BYTES) + body


def reply_bytes(data: bytes, headers: Mapping[str, str]) -> bytes:
  """The ``reply`` tensor's bytes (the service's JSON reply) of a 200 response's
  ``data`` and ``headers``; a response without a binary header is returned whole
  (an error's JSON)."""
  n = headers.get("Inference-Header-Content-Length")
  return data[int(n):] if n else data
