"""Multi-node without a shared filesystem: a two-node Ray cluster on 127.0.0.1 (a head and a
second node joined with `ray start --address`, each with its own temp dir, cache folder and one
CPU), one training worker on each, checkpoints and prepared data in a real S3 server on loopback
(moto). Nothing on disk is shared on purpose: before resuming, the test deletes every local copy
(run dir and every node's cache), so whatever the resume finds came from the bucket."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.train.stop import STOPPED_EXIT_CODE
from tests.helpers import ROOT, RayHead, sheepop, wait_for

STEPS = 8
BUCKET = "multinode"


def args(run_dir: Path, name: str, *extra: str, steps: int = STEPS, save_every: int = 4) -> list[str]:
    return ["model=tiny", "trainer=quick", "logger=none", "parallelism=zero2", "trainer.precision=fp32",
            "trainer.progress=false", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
            "trainer.eval_every=0", f"trainer.max_steps={steps}", f"trainer.save_every={save_every}",
            "data.max_bytes=3000000", f"data.out_dir=s3://{BUCKET}/data/stdlib-3mb",
            f"cluster.storage_path=s3://{BUCKET}/runs", f"run.name={name}", f"run.dir={run_dir}", *extra]


def losses(run: Path) -> dict[int, float]:
    return dict(zip(*latest_per_step(read_metrics(run), "loss")))


@pytest.fixture(scope="module")
def two_nodes(s3, tmp_path_factory):
    """(head, driver env, cache folders, second node): each node and the driver get a cache folder of their own."""
    base = tmp_path_factory.mktemp("nodes")
    s3.bucket(BUCKET)
    caches = {n: base / f"cache-{n}" for n in ("driver", "head", "node1")}
    head = RayHead.start(num_cpus=1, env={**s3.env(), "SHEEPOP_CACHE_DIR": str(caches["head"])})
    node = head.add_node(num_cpus=1, env={**s3.env(), "SHEEPOP_CACHE_DIR": str(caches["node1"])})
    driver_env = {**s3.env(), "SHEEPOP_CACHE_DIR": str(caches["driver"])}
    try:
        yield head, driver_env, caches, node
    finally:
        node.stop()
        head.stop()


@pytest.fixture(scope="module")
def full_run(two_nodes, s3, tmp_path_factory):
    head, env, caches, _ = two_nodes
    run = tmp_path_factory.mktemp("full") / "run"
    stage = run.parent / "stage"  # where each rank writes a checkpoint before its upload (default: RAM)
    r = sheepop("train", *args(run, "full", "cluster=ray", f"cluster.address={head.gcs_address}",
                               "cluster.num_workers=2", f"cluster.checkpoint_staging={stage}"), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert stage.is_dir() and not list(stage.iterdir()), "a staged checkpoint outlived its upload"
    return run


def test_each_rank_uploads_its_shard_and_a_manifest(full_run, two_nodes, s3):
    keys = s3.keys(BUCKET, "runs/full/")
    ckpt = "runs/full/checkpoints/step_000004/"
    shards = sorted(k for k in keys if k.startswith(ckpt + "ds/") and k.endswith("optim_states.pt"))
    assert [Path(k).name for k in shards] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                               "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    markers = {k: json.loads(s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read())
               for k in (ckpt + "done/rank_0.json", ckpt + "done/rank_1.json")}
    for k, m in markers.items():  # every listed file is in the bucket at its listed size
        assert all(keys[ckpt + f] == size for f, (size, _sha) in m["files"].items()), k
    assert any("rank_1" in f for f in markers[ckpt + "done/rank_1.json"]["files"])
    for f in ("config.yaml", "metrics.jsonl", "tokenizer.json", "loss.png"):  # the run's own files, mirrored
        assert f"runs/full/{f}" in keys
    # Both nodes trained: each filled its own data cache from the bucket (no node prepared data).
    _, _, caches, _ = two_nodes
    for n in ("head", "node1"):
        shards_here = list((caches[n] / "storage" / "s3" / BUCKET / "data" / "stdlib-3mb").glob("train_*.bin"))
        assert shards_here, f"node {n} read no data from the bucket"
        assert not (caches[n] / "storage" / "s3" / BUCKET / "data" / "stdlib-3mb.tmp").exists()


def test_resume_from_storage_alone_continues_exactly(full_run, two_nodes, tmp_path):
    """Every local copy deleted; the resume reads checkpoint and data from the bucket only."""
    head, env, caches, _ = two_nodes
    for c in caches.values():
        shutil.rmtree(c, ignore_errors=True)
    run = tmp_path / "resumed"
    r = sheepop("train", *args(run, "resumed", "cluster=ray", f"cluster.address={head.gcs_address}",
                               "cluster.num_workers=2",
                               f"trainer.resume=s3://{BUCKET}/runs/full/checkpoints/step_000004"), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    start = next(e for e in read_metrics(run) if e.get("event") == "resume")
    assert start["step"] == 4 and start["world_size"] == 2
    full, resumed = losses(full_run), losses(run)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    assert max(abs(full[s] - resumed[s]) for s in resumed) < 1e-4


def test_drained_node_checkpoints_and_the_run_goes_on_on_the_other(two_nodes, s3, tmp_path):
    """A spot notice for the second node (`ray drain-node --reason PREEMPTION` with a deadline): every
    rank saves a checkpoint at once and training goes on; the node then dies (its `ray start` ended by
    PID) and, with cluster.min_workers=1, Ray Train restarts the group on the one node left. The
    driver's plan has the 1-worker batch (global batch 8, accumulation 2); rank 0 converts the 2-rank
    checkpoint in the bucket to the universal form; the re-run steps equal the 2-worker ones. The run
    is far longer than the test (a tiny step takes ~0.05 s: a run that could end first raced the drain);
    a SIGTERM ends it once the one worker has trained a few steps. Last in this module: it ends the
    second node."""
    head, env, _, node = two_nodes
    run = tmp_path / "drained"
    cmd = [sys.executable, "-m", "sheepop.cli", "train",
           *args(run, "drained", "cluster=ray", f"cluster.address={head.gcs_address}", "cluster.num_workers=2",
                 "cluster.min_workers=1", "cluster.max_failures=1", steps=1_000_000, save_every=0)]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)

    def one_worker_steps() -> list[int]:
        return [r["step"] for r in read_metrics(run) if "loss" in r and r.get("attempt", 0) >= 1]

    try:
        wait_for(lambda: any(r.get("step", 0) >= 3 and "loss" in r for r in read_metrics(run)) or p.poll() is not None,
                 600, "step 3")  # a hang guard
        node.drain(deadline_s=120)
        (saved,) = wait_for(lambda: [e for e in read_metrics(run) if e.get("event") == "save_requested"]
                            or p.poll() is not None, 120, "the drain's save request")
        prefix = f"runs/drained/checkpoints/step_{saved['step']:06d}/"
        wait_for(lambda: {prefix + "done/rank_0.json", prefix + "done/rank_1.json"} <= set(s3.keys(BUCKET, prefix)),
                 120, "the drain's checkpoint in the bucket")
        # ... and registered by Ray Train (its snapshot names it): what a restart resumes from. A real
        # spot deadline (30-120 s) leaves time for both; the test does not kill the node before.
        snapshot = "runs/drained/checkpoints/checkpoint_manager_snapshot.json"
        wait_for(lambda: f'"latest_checkpoint_result":{{"version":0,"checkpoint_dir_name":"step_{saved["step"]:06d}"'
                 in s3.read(BUCKET, snapshot), 120, "Ray Train to register the drain's checkpoint")
        node.stop()  # the spot instance goes away (well before its deadline)
        wait_for(lambda: len(one_worker_steps()) >= 5 or p.poll() is not None, 600, "5 steps on the node left")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == STOPPED_EXIT_CODE, out[-2000:] + err[-3000:]
    assert "is being drained" in saved["reason"] and "being drained" in out
    rows = read_metrics(run)
    resume = [e for e in rows if e.get("event") == "resume"][-1]
    assert resume["world_size"] == 1 and resume["global_batch"] == 8 and resume["grad_accum"] == 2
    assert resume["step"] == saved["step"] and resume["universal"] is True
    # The one-worker group's rank 0 removed the files of the rank that is gone (they named a dead process).
    assert not (run / "rank1.json").exists() and not (run / "heartbeats" / "rank1.json").exists()
    assert any(k.startswith(f"runs/drained/universal/step_{saved['step']:06d}/") for k in s3.keys(BUCKET, "runs/drained/"))
    steps, _ = latest_per_step(rows, "loss")
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= saved["step"] + 5
    two = {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("attempt") == 0}
    one = {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("attempt") == 1}
    again = sorted(set(two) & set(one))
    assert again and again[0] == saved["step"] + 1, (saved["step"], sorted(two)[-3:], sorted(one)[:3])
    assert max(abs(two[s] - one[s]) for s in again) < 1e-4
