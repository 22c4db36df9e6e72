"""Network: free ports, and reachability checks that fail in one line before anything slow starts."""
from __future__ import annotations

import os
import socket

from sheepop.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (for rendezvous and test clusters)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require_listening(host: str, port: int, setting: str, hint: str, timeout: float = 3.0) -> None:
    """UserError naming `setting` (e.g. "--address=...") when nothing accepts TCP at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"{setting}: nothing answers at {host}:{port} ({e.strerror or e}); {hint}") from None
