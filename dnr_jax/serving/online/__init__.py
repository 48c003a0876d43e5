"""The reranker online: an HTTP service with dynamic batching (LitServe).

* ``requests``: one request's JSON format, its checks, a batch as arrays, the replies;
* ``service``: ``ServiceConfig``, ``build_server`` and ``serve`` (the
  ``experiments.serve`` binary's one call);
* ``metrics``: the Prometheus metrics its processes share.

Needs the ``serve`` extra (``pip install -e ".[serve]"``): LitServe and
prometheus-client are never dependencies of the library itself.
"""
