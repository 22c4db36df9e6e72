"""Multi-node without a shared filesystem: a two-node Ray cluster on 127.0.0.1 (a head and a
second node joined with `ray start --address`, each with its own temp dir, cache folder and one
CPU), one training worker on each, checkpoints and prepared data in a real S3 server on loopback
(moto). Nothing on disk is shared on purpose: before resuming, the test deletes every local copy
(run dir and every node's cache), so whatever the resume finds came from the bucket."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from tests.helpers import RayHead, sheepop

STEPS = 8
BUCKET = "multinode"


def args(run_dir: Path, name: str, *extra: str) -> list[str]:
    return ["model=tiny", "trainer=quick", "logger=none", "parallelism=zero2", "trainer.precision=fp32",
            "trainer.progress=false", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
            "trainer.eval_every=0", f"trainer.max_steps={STEPS}", "trainer.save_every=4",
            "data.max_bytes=3000000", f"data.out_dir=s3://{BUCKET}/data/stdlib-3mb",
            f"cluster.storage_path=s3://{BUCKET}/runs", f"run.name={name}", f"run.dir={run_dir}", *extra]


def losses(run: Path) -> dict[int, float]:
    return dict(zip(*latest_per_step(read_metrics(run), "loss")))


@pytest.fixture(scope="module")
def two_nodes(s3, tmp_path_factory):
    """(head, driver env, cache folders): each node and the driver get a cache folder of their own."""
    base = tmp_path_factory.mktemp("nodes")
    s3.bucket(BUCKET)
    caches = {n: base / f"cache-{n}" for n in ("driver", "head", "node1")}
    head = RayHead.start(num_cpus=1, env={**s3.env(), "SHEEPOP_CACHE_DIR": str(caches["head"])})
    node = head.add_node(num_cpus=1, env={**s3.env(), "SHEEPOP_CACHE_DIR": str(caches["node1"])})
    driver_env = {**s3.env(), "SHEEPOP_CACHE_DIR": str(caches["driver"])}
    try:
        yield head, driver_env, caches
    finally:
        node.stop()
        head.stop()


@pytest.fixture(scope="module")
def full_run(two_nodes, s3, tmp_path_factory):
    head, env, caches = two_nodes
    run = tmp_path_factory.mktemp("full") / "run"
    r = sheepop("train", *args(run, "full", "cluster=ray", f"cluster.address={head.gcs_address}",
                               "cluster.num_workers=2"), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
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
    _, _, caches = two_nodes
    for n in ("head", "node1"):
        shards_here = list((caches[n] / "storage" / "s3" / BUCKET / "data" / "stdlib-3mb").glob("train_*.bin"))
        assert shards_here, f"node {n} read no data from the bucket"
        assert not (caches[n] / "storage" / "s3" / BUCKET / "data" / "stdlib-3mb.tmp").exists()


def test_resume_from_storage_alone_continues_exactly(full_run, two_nodes, tmp_path):
    """Every local copy deleted; the resume reads checkpoint and data from the bucket only."""
    head, env, caches = two_nodes
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


def test_two_to_one_resume_from_storage(full_run, two_nodes, s3, tmp_path):
    """2 ranks → 1: the driver converts the checkpoint in the bucket to the universal form (beside
    it, in the bucket), the one rank downloads that; the global batch stays 8 (accumulation 2)."""
    head, env, _ = two_nodes
    run = tmp_path / "one"
    r = sheepop("train", *args(run, "one", "cluster=ray", f"cluster.address={head.gcs_address}",
                               "cluster.num_workers=1",
                               f"trainer.resume=s3://{BUCKET}/runs/full/checkpoints/step_000004"), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    start = next(e for e in read_metrics(run) if e.get("event") == "resume")
    assert start["world_size"] == 1 and start["grad_accum"] == 2 and start["universal"] is True
    assert any(k.startswith("runs/full/universal/step_000004/ds/zero/") for k in s3.keys(BUCKET, "runs/full/"))
    full, one = losses(full_run), losses(run)
    assert sorted(one) == list(range(5, STEPS + 1))
    assert max(abs(full[s] - one[s]) for s in one) < 1e-4
