"""Real Ray Train workers running real DeepSpeed ZeRO on gloo: stages 0-3, a killed worker,
resuming on a different number of workers, ZeRO-3 offload, a local cluster on loopback only.
The checks that fail before any worker starts: tests/unit/test_distributed.py.

All runs share one Ray head on 127.0.0.1 (the session's `ray_head` fixture) and use fp32 so
that runs which should be identical can be compared to 1e-4.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.train.checkpoint import consolidated_state_dict
from sheepop.train.checkpoint_files import latest
from tests.helpers import ROOT, TINY_DATA, one_error_line, sheepop

STEPS = 12


def dist_args(run: Path, *extra: str) -> list[str]:
    return ["model=tiny", "trainer=quick", "logger=none", f"run.dir={run}", *TINY_DATA,
            "trainer.precision=fp32", "trainer.progress=false",
            "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.eval_every=0",
            f"trainer.max_steps={STEPS}", "trainer.save_every=6", *extra]


def on_ray(head, run: Path, *extra: str) -> list[str]:
    return dist_args(run, "cluster=ray", f"cluster.address={head.gcs_address}", "cluster.num_workers=2", *extra)


def losses(run: Path) -> dict[int, float]:
    return dict(zip(*latest_per_step(read_metrics(run), "loss")))


@pytest.fixture(scope="module")
def stage_runs(ray_head, tmp_path_factory):
    """One 2-worker run per ZeRO stage, same seed and data."""
    runs = {}
    for stage, preset in enumerate(("ddp", "zero1", "zero2", "zero3")):
        run = tmp_path_factory.mktemp("stages") / preset
        r = sheepop("train", *on_ray(ray_head, run, f"parallelism={preset}"))
        assert r.returncode == 0, f"{preset}: {r.stderr[-3000:]}"
        runs[stage] = run
    return runs


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_on_two_workers_and_ranks_agree(stage_runs, stage):
    run = stage_runs[stage]
    loss = losses(run)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert sum(list(loss.values())[-3:]) / 3 < sum(list(loss.values())[:3]) / 3 - 0.3  # it learns
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert abs(ranks[0]["probe_loss"] - ranks[1]["probe_loss"]) < 1e-6  # both ranks hold the same model
    start = next(e for e in read_metrics(run) if e.get("event") == "start")
    assert start["grad_accum"] == 1 and start["global_batch"] == 8
    # ZeRO stage ≥ 1 leaves one optimizer shard per rank in the checkpoint.
    shards = list((run / "checkpoints" / f"step_{STEPS:06d}" / "ds").glob("*optim_states.pt"))
    assert len(shards) == (2 if stage else 0)


def test_zero3_gathered_model_equals_stage0(stage_runs):
    ref = losses(stage_runs[0])
    for stage in (1, 2, 3):
        diff = max(abs(ref[s] - losses(stage_runs[stage])[s]) for s in ref)
        assert diff < 1e-4, (stage, diff)
    w0 = consolidated_state_dict(stage_runs[0] / "checkpoints" / f"step_{STEPS:06d}")
    w3 = consolidated_state_dict(stage_runs[3] / "checkpoints" / f"step_{STEPS:06d}")
    assert set(w3) <= set(w0) and len(w3) >= len(w0) - 1  # tied head may be listed once
    assert max((w0[k] - w3[k]).abs().max().item() for k in w3) < 1e-4


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_two_workers_on_one_keeps_global_batch(stage_runs, tmp_path, stage):
    """2 workers → 1 worker (accumulation 1 → 2): the run continues as if nothing changed."""
    src = stage_runs[stage] / "checkpoints" / "step_000006"
    run = tmp_path / "one"
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    r = sheepop("train", *dist_args(run, "cluster=process", f"parallelism={['ddp', 'zero1', 'zero2', 'zero3'][stage]}",
                                    f"trainer.resume={src}"))
    assert r.returncode == 0, r.stderr[-3000:]
    start = next(e for e in read_metrics(run) if e.get("event") == "resume")
    assert start["world_size"] == 1 and start["grad_accum"] == 2 and start["universal"] is True
    two, one = losses(stage_runs[stage]), losses(run)
    assert sorted(one) == list(range(7, STEPS + 1))
    # Both stages continue exactly. (Without compat.fix_zero3_universal_load, DeepSpeed 0.19's ZeRO-3 universal
    # load shares one Adam step counter between the param groups and stage 3 drifted by ~5e-3 in 6 steps.)
    assert max(abs(two[s] - one[s]) for s in one) < 1e-4
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before  # the source checkpoint is untouched
    # converted into the resuming run, not into the source run (which may be read-only)
    assert not (src.parent.parent / "universal").exists()
    (converted,) = (run / "universal").glob(f"{src.name}-from-*")
    assert (converted / "ds" / "zero").is_dir()


def test_killed_worker_restarts_from_last_checkpoint(ray_head, tmp_path):
    """A worker killed right after a checkpoint completed in storage: the restarted group goes on
    from that checkpoint, although Ray Train's controller, polling every 2 s (Ray's own default),
    has most likely not taken its report yet (it hands the group an older checkpoint, or none:
    before sheepop.train.restart, the run went back to step 0)."""
    run = tmp_path / "ft"
    args = on_ray(ray_head, run, "parallelism=zero2", "cluster.max_failures=1", "trainer.max_steps=20",
                  "trainer.save_every=5")
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train", *args], cwd=ROOT,
                         env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = saved = None
    deadline = time.monotonic() + 600  # a hang guard: step 5's checkpoint comes within a minute or two normally
    while time.monotonic() < deadline and p.poll() is None and killed is None:
        done = [r for r in read_metrics(run) if "loss" in r]
        status = run / "rank1.json"
        complete = latest(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        # The first complete checkpoint this loop sees (step 5; on a fast machine it may first see 10 or 15)
        # while the run is past it.
        step = int(complete.rsplit("_", 1)[1]) if complete else 0
        if 0 < step < 20 and done and done[-1]["step"] > step and status.is_file():
            killed, saved = json.loads(status.read_text())["pid"], step
            os.kill(killed, signal.SIGKILL)  # a real worker process dies mid-run
        time.sleep(0.05)
    if killed is None:
        p.kill()
    out, err = p.communicate(timeout=900)
    assert killed is not None, err[-3000:]
    assert p.returncode == 0, err[-3000:]
    events = read_metrics(run)
    resumes = [e for e in events if e.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["attempt"] == 1 and resumes[0]["step"] == saved, (saved, resumes)
    assert json.loads((run / "rank1.json").read_text())["pid"] != killed  # a new process took over
    assert sorted(losses(run)) == list(range(1, 21))
    # Steps run twice (before the kill and after the restart) give the same loss: nothing was lost.
    first = {r["step"]: r["loss"] for r in events[: events.index(resumes[0])] if "loss" in r}
    second = {r["step"]: r["loss"] for r in events[events.index(resumes[0]):] if "loss" in r}
    again = set(first) & set(second)
    assert again and max(abs(first[s] - second[s]) for s in again) < 1e-4
    # Every checkpoint this run saved carries its launch id (how a restart knows its own).
    assert len({json.loads((c / "meta.json").read_text())["launch"] for c in (run / "checkpoints").glob("step_*")}) == 1


def test_zero3_offload_trains_like_stage0(tmp_path):
    """Parameters and optimizer state in CPU memory (DeepSpeed's CPU Adam, JIT-built once):
    one rank, same seed and data as plain data parallel, same losses."""
    ref, off = tmp_path / "ddp", tmp_path / "offload"
    for run, preset in ((ref, "ddp"), (off, "zero3_offload")):
        r = sheepop("train", *dist_args(run, "cluster=process", f"parallelism={preset}", "trainer.max_steps=8",
                                        "trainer.save_every=0"))
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(ref), losses(off)
    assert sorted(b) == list(range(1, 9)) and b[8] < b[1]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-3, (a, b)
    assert len(list((off / "checkpoints" / "step_000008" / "ds").glob("*optim_states.pt"))) == 1


LISTENERS = r'''
import json, os, sys, psutil, ray
from rich.console import Console
from sheepop.config import compose
from sheepop.driver.ray_runner import start_ray

start_ray(compose(["cluster=local", "cluster.num_cpus=1", "logger=none", *sys.argv[1:]]), Console(quiet=True))
ifname, tp = ray.get(ray.remote(lambda: (os.environ.get("GLOO_SOCKET_IFNAME"),  # a worker is up too
                                          os.environ.get("TOKENIZERS_PARALLELISM"))).remote())
socks, procs = [], []
for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        procs.append(" ".join(p.cmdline()))
        socks += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps({"ifname": ifname, "tokenizers_parallelism": tp, "socks": socks, "procs": procs}))
'''


def local_ray(*overrides: str) -> dict:
    r = subprocess.run([sys.executable, "-c", LISTENERS, *overrides], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_local_cluster_listens_on_loopback_only():
    """cluster=local: every TCP port of the Ray instance sheepop starts (GCS, raylet, object manager,
    dashboard, agents, workers) is bound to 127.0.0.1, and workers pin gloo to the loopback interface."""
    got = local_ray("cluster.dashboard=true")
    assert [p for p in got["procs"] if "ray-dashboard-" in p]  # there, and bound to loopback below
    names = {name for name, _, _ in got["socks"]}
    assert {"gcs_server", "raylet"} <= names, got["socks"]  # the core services were seen listening
    outside = [s for s in got["socks"] if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert outside == [], outside
    assert got["ifname"] == "lo"
    # Its workers inherit the environment sheepop gives them (no runtime_env: see start_ray).
    assert got["tokenizers_parallelism"] == "false"


def test_more_workers_than_the_cluster_can_place_fail_in_one_line(ray_head, tmp_path):
    """A running cluster with 2 CPUs cannot place 3 one-CPU workers: say so, do not wait forever."""
    r = sheepop("train", *on_ray(ray_head, tmp_path / "run", "cluster.num_workers=3", "trainer.global_batch_size=12"))
    line = one_error_line(r)
    assert "cluster.num_workers=3 workers × (1 CPU) each; the cluster has 2 CPU" in line and "room for 2" in line


def test_local_cluster_without_dashboard():
    """cluster.dashboard=false (the default): no dashboard process, nothing on its port (bench/local_ray_cost.py:
    about 0.9 GB less memory on a 2-core machine)."""
    got = local_ray()
    # Ray still runs dashboard.py for its usage-stats module alone, without the UI or the module heads.
    heads = [p for p in got["procs"] if "ray-dashboard-" in p]
    assert not heads, heads
    assert all("--disable-frontend" in p for p in got["procs"] if "dashboard/dashboard.py" in p)
    assert 8265 not in {port for _, _, port in got["socks"]}
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in got["socks"]}  # Ray itself is there
