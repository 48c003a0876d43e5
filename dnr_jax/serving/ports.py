"""Whether a server can listen where it is told to, checked before anything starts."""

from __future__ import annotations

import socket

from dnr_jax import errors


def check_port_free(host: str, port: int, flag: str = "port") -> None:
  """Raises ``ConfigError`` naming ``flag`` where ``host:port`` cannot be bound.

  A server that binds its port after its start-up (uvicorn inside LitServe's run,
  ``tritonserver`` after loading its models) logs a taken port and exits; checked
  here, it is one line naming the flag, before any process starts. Bound as those
  servers bind it, with SO_REUSEADDR: a port in TIME_WAIT is free to both.
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
  try:
    with socket.socket(family, socket.SOCK_STREAM) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, port))
  except OSError as e:
    raise errors.ConfigError(
        f"{flag}={port}: cannot listen on {where} ({e.strerror}); is another server "
        f"there? Pick another --{flag} (or another --host)") from None
