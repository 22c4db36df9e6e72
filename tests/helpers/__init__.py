"""What the tests share: paths, the real CLI in a subprocess, the tiny-run overrides, a Ray head.

Imported as `from tests.helpers import ...` (pyproject's pythonpath = ["."], and tests/ is a
package), from tests/unit and tests/integration alike. Environment setup and fixtures stay in
tests/conftest.py; nothing here changes the environment on import.

Time limits here are hang guards, never speed checks: each is several times what the slowest
normal case takes on a loaded 2-core machine. How fast things are is bench/'s business.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sheepop.net import free_port

__all__ = ["ROOT", "TMP", "DATA_DIR", "TINY_DATA", "CLI_TIMEOUT", "sheepop", "tiny_overrides", "one_error_line",
           "letters_only_tokenizer", "wait_for", "free_port", "plan_without_data", "RayHead", "RayNode"]

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: tests/helpers/__init__.py)
TMP = Path(os.environ.get("SHEEPOP_TEST_TMP", "/tmp/sheepop-tests"))  # W&B dirs, caches, shared data
# Prepared corpora are shared by all tests (and reused across runs: prepare() checks inputs).
DATA_DIR = TMP / "data"
TINY_DATA = ["data.max_bytes=3000000", f"data.out_dir={DATA_DIR}/stdlib-3mb-v1024"]  # a 3 MB stdlib slice

# A hang guard for one CLI call, training included: a tiny run takes well under a minute here.
CLI_TIMEOUT = 900.0


def sheepop(*args: str, timeout: float = CLI_TIMEOUT, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m sheepop.cli ARGS`) in a subprocess; text stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "sheepop.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    """A fast, deterministic in-process run of the tiny model on a slice of the stdlib."""
    return ["model=tiny", "trainer=quick", "cluster=process", "logger=none", f"run.dir={run_dir}", *TINY_DATA,
            *extra]


def plan_without_data(cfg, tmp_path: Path):
    """(the driver's RunPlan for cfg, the data folder it names): the manifest of data prepared here,
    but data.out_dir pointing where nothing was prepared, as a node without the data would see it."""
    import dataclasses

    from sheepop.data.shards import load_manifest
    from sheepop.driver.runner import make_plan

    manifest = load_manifest(cfg.data.out_dir)  # what the driver prepared, on its node
    elsewhere = tmp_path / "not-prepared-here"
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(tmp_path / "run")),
                              data=dataclasses.replace(cfg.data, out_dir=str(elsewhere)))
    return make_plan(cfg, None, manifest), elsewhere


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """A user error: exit 2, exactly one line on stderr, no traceback. Returns that line."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def letters_only_tokenizer():
    """A BPE without byte fallback (as a user's tokenizer.path might be): ASCII letters only."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def foo bar baz qux"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>"], show_progress=False))
    return tok


def wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    """Poll `cond()` until it returns something truthy (returned); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


@dataclass
class RayHead:
    """A `ray start --head --block` on 127.0.0.1 with its own free ports and temp dir.

    Every port is chosen free (other people's clusters may run on this machine), token auth is
    off, and the temp dir is short (Ray's socket paths must stay < 108 chars). The head inherits
    this process's environment with the venv's bin first on PATH, so a job's `python` is this
    interpreter. `stop()` ends it by PID (SIGTERM: `ray start --block` stops everything it
    started), never with `ray stop`, which would stop every Ray on the machine.
    """

    address: str  # http://127.0.0.1:<dashboard port>: the jobs API
    gcs_address: str  # 127.0.0.1:<gcs port>: for cluster.address
    temp_dir: Path
    proc: subprocess.Popen

    START_TIMEOUT = 300.0  # hang guard: the head answers in ~10-30 s

    @classmethod
    def start(cls, num_cpus: int = 2, env: dict | None = None, resources: str | None = None) -> "RayHead":
        """env: extra variables for the head's processes (its workers inherit them);
        resources: a JSON dict of custom resources (e.g. '{"head": 1}')."""
        temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        gcs, dash = free_port(), free_port()
        ports = {f"--{k}": str(free_port()) for k in (
            "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}
        env = _node_env(temp_dir, env)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address",
               "127.0.0.1", "--dashboard-host", "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dash),
               "--num-cpus", str(num_cpus), "--object-store-memory", str(300 * 2**20), "--temp-dir", str(temp_dir),
               "--disable-usage-stats", *[x for kv in ports.items() for x in kv],
               *(["--resources", resources] if resources else [])]
        with open(temp_dir / "ray-start.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        head = cls(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", temp_dir, proc)
        deadline = time.monotonic() + cls.START_TIMEOUT
        while not head.answers():  # up when the jobs API answers (the dashboard starts after the GCS)
            if proc.poll() is not None or time.monotonic() > deadline:
                log = head.log()
                head.stop()
                raise RuntimeError(f"ray head did not start: {log[-2000:]}")
            time.sleep(0.3)
        return head

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/jobs/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        try:
            return (self.temp_dir / "ray-start.log").read_text()
        except OSError:
            return ""

    def add_node(self, num_cpus: int = 2, env: dict | None = None, resources: str | None = None) -> "RayNode":
        """A second Ray node joining this head (`ray start --address`), with its own ports and
        environment, all on 127.0.0.1: another machine, as far as Ray can tell."""
        return RayNode.start(self, num_cpus, env, resources)

    def stop(self) -> None:
        import psutil

        _end(self.proc)
        # Anything still alive that names our temp dir (workers, agents) goes by PID.
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(self.temp_dir) in a for a in (p.info["cmdline"] or [])):
                    p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM (`ray start --block` then stops everything it started), SIGKILL after a minute."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _node_env(temp_dir: Path, extra: dict | None) -> dict:
    # A test that ran cluster=local in this process set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    # (compat.ray_loopback_only): a test cluster's nodes must not inherit it, or no second node joins.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_TMPDIR": str(temp_dir),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM otherwise waits 30 s "draining" the node
            **(extra or {})}


@dataclass
class RayNode:
    """A worker node (`ray start --address HEAD --block`) on 127.0.0.1 with its own free ports and
    environment; stopped by PID like the head."""

    head: RayHead
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, head: RayHead, num_cpus: int, env: dict | None, resources: str | None) -> "RayNode":
        ports = {f"--{k}": str(free_port()) for k in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "node-manager-port", "object-manager-port")}
        log_path = head.temp_dir / f"ray-node-{len(list(head.temp_dir.glob('ray-node-*.log')))}.log"
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--address", head.gcs_address, "--block",
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--object-store-memory", str(300 * 2**20), "--disable-usage-stats",
               *[x for kv in ports.items() for x in kv], *(["--resources", resources] if resources else [])]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=_node_env(head.temp_dir, env), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = cls(head, proc, log_path)

        def joined() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ray node did not start: {log_path.read_text()[-2000:]}")
            alive = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", "nodes", "--address",
                                    head.address, "--format", "json", "--filter", "state=ALIVE"],
                                   capture_output=True, text=True, env=_node_env(head.temp_dir, None))
            return alive.returncode == 0 and alive.stdout.count('"node_id"') >= 2

        wait_for(joined, RayHead.START_TIMEOUT, "the second Ray node to join", poll=1.0)
        return node

    def node_id(self) -> str:
        """This node's Ray id: the cluster's one live node that is not the head (a two-node cluster)."""
        out = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", "nodes", "--address", self.head.address,
                              "--format", "json", "--filter", "state=ALIVE"], capture_output=True, text=True,
                             env=_node_env(self.head.temp_dir, None), check=True).stdout
        (node,) = [n["node_id"] for n in json.loads(out) if not n.get("is_head_node")]
        return node

    def drain(self, deadline_s: int, message: str = "spot instance reclaimed") -> None:
        """What a cloud autoscaler does on a spot notice: `ray drain-node --reason PREEMPTION`."""
        subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", self.head.gcs_address,
                        "--node-id", self.node_id(), "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", message, "--deadline-remaining-seconds", str(deadline_s)],
                       env=_node_env(self.head.temp_dir, None), check=True, capture_output=True, text=True)

    def stop(self) -> None:
        _end(self.proc)


def saved_bytes(model, idx, precision: str, block: int | None = None, doc_ids=None) -> int:
    """Bytes autograd saves in a training forward of a sheepop Transformer (weights aside). block:
    those of that block's own forward alone, which is what a checkpointed block saves again while
    backward recomputes it. doc_ids: data.document_mask's document index of each position."""
    import functools

    import torch

    from sheepop.model.transformer import rope_angles

    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # counted elsewhere

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    run = functools.partial(model, idx, idx, doc_ids=doc_ids)
    if block is not None:  # its input (made outside the hooks) and its class forward, never checkpointed
        from sheepop.model.transformer import document_attention

        b, x = model.layers[block], model.tok_emb(idx)
        positions, mask = document_attention(doc_ids) if doc_ids is not None else (torch.arange(idx.shape[1]), None)
        cos, sin = rope_angles(positions, model.args.head_dim, model.args.rope_theta)
        run = functools.partial(type(b).forward, b, x, cos, sin, None, mask)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        run()
    return sum(seen.values())
