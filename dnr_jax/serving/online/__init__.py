"""The reranker online: an HTTP service with dynamic batching (LitServe).

* ``requests``: one request's JSON format, its checks, a batch as arrays, the replies;
* ``endpoint``: ``POST /rerank`` in the HTTP process (read, check, queue, reply,
  count);
* ``api``: the reranker as LitServe's API, the worker's side (batching, scoring);
* ``server``: LitServe's server as the service runs it (pipe queues, a drainable
  socket);
* ``service``: ``ServiceConfig``, ``build_server`` and ``serve`` (the
  ``experiments.serve`` binary's one call: start-up checks, the drain);
* ``metrics``: the Prometheus metrics its processes share.

Needs the ``serve`` extra (``pip install -e ".[serve]"``): LitServe and
prometheus-client are never dependencies of the library itself.
"""
