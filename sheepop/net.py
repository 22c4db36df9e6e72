"""Network: reachability checks that fail in one line before anything slow starts, and keeping
the Ray instances sheepop starts on 127.0.0.1."""
from __future__ import annotations

import os
import socket

from sheepop.errors import UserError


def require_listening(host: str, port: int, setting: str, hint: str, timeout: float = 3.0) -> None:
    """UserError naming `setting` (e.g. "--address=...") when nothing accepts TCP at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"{setting}: nothing answers at {host}:{port} ({e.strerror or e}); {hint}") from None


def ray_loopback_only() -> dict[str, str]:
    """Make the Ray instance this process starts listen on 127.0.0.1 only; returns env vars for its workers.

    Ray's gRPC servers (GCS, raylet, object manager, core workers, agents) bind loopback only when
    the node IP is loopback, but on Linux Ray rewrites a node IP of 127.0.0.1 to the machine's
    external address (services.resolve_ip_for_localhost) unless ENABLE_RAY_CLUSTER is off, which
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does (read once, at `import ray`: set both). Ray's own
    processes inherit the variable. It also stops other machines from joining: right for a
    single-machine cluster. Gloo's listeners follow GLOO_SOCKET_IFNAME (the loopback interface).
    What remains is PyTorch's TCPStore on rank 0, which binds all interfaces while training runs.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    loopback = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
    return {"GLOO_SOCKET_IFNAME": loopback} if loopback else {}
