"""Shared test setup: nothing lands in the home directory, W&B stays offline, Ray stays local."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_TMP = Path(os.environ.get("SHEEPOP_TEST_TMP", "/tmp/sheepop-tests"))
_TMP.mkdir(parents=True, exist_ok=True)

os.environ.update({
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": str(_TMP / "wandb"),
    "WANDB_CONFIG_DIR": str(_TMP / "wandb-config"),
    "WANDB_CACHE_DIR": str(_TMP / "wandb-cache"),
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "SHEEPOP_CACHE_DIR": str(_TMP / "cache"),  # the CPU peak-FLOP/s probe's cache
})
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)

# Prepared corpora are shared by all tests (and reused across runs: prepare() checks inputs).
DATA_DIR = _TMP / "data"


def sheepop(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path | None = None):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "sheepop.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    """A fast, deterministic in-process run of the tiny model on a slice of the stdlib."""
    return ["model=tiny", "trainer=quick", "cluster=process", "logger=none", f"run.dir={run_dir}",
            "data.max_bytes=3000000", f"data.out_dir={DATA_DIR}/stdlib-3mb-v1024", *extra]


@pytest.fixture(scope="session")
def tiny_cfg():
    """Composed config dict for the tiny model with its data prepared."""
    from sheepop.config import compose, to_dict
    from sheepop.data.shards import prepare

    cfg = to_dict(compose(tiny_overrides(_TMP / "unused")))
    prepare(cfg, log=lambda *_: None)
    return cfg


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A `ray start --head` on 127.0.0.1 with its own ports and temp dir (see ray_head)."""

    def __init__(self, address: str, gcs_address: str, temp_dir: Path, proc: subprocess.Popen):
        self.address, self.gcs_address, self.temp_dir, self.proc = address, gcs_address, temp_dir, proc


@pytest.fixture(scope="session")
def ray_head():
    """One real Ray head for the session: every port chosen free (other people's clusters may run
    on this machine), everything on 127.0.0.1, token auth off, a short temp dir of its own.

    `ray start --block` stays in the foreground and, on SIGTERM, stops every process it started;
    it is stopped that way (by PID) rather than with `ray stop`, which would stop every Ray on
    the machine. The head inherits this process's environment (W&B offline, dirs under _TMP), and
    the venv's bin comes first on PATH so a job's `python` is this interpreter."""
    import shutil
    import tempfile
    import time
    import urllib.request

    import psutil

    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # socket paths must stay < 108 chars
    gcs, dash = _free_port(), _free_port()
    ports = {f"--{k}": str(_free_port()) for k in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_TMPDIR": str(temp_dir),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # SIGTERM otherwise waits 30 s "draining" the node
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dash), "--num-cpus", "2",
           "--object-store-memory", str(300 * 2**20), "--temp-dir", str(temp_dir), "--disable-usage-stats",
           *[x for kv in ports.items() for x in kv]]
    log = open(temp_dir / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while True:  # up when the jobs API answers (the dashboard starts a moment after the GCS)
        try:
            with urllib.request.urlopen(f"{address}/api/jobs/", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"ray head did not start: {(temp_dir / 'ray-start.log').read_text()[-2000:]}")
        time.sleep(0.3)
    try:
        yield RayHead(address, f"127.0.0.1:{gcs}", temp_dir, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        # Anything still alive that names our temp dir (workers, agents) goes by PID.
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(temp_dir) in a for a in (p.info["cmdline"] or [])):
                    p.kill()
            except psutil.Error:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
