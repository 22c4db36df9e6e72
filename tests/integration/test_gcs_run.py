"""A training run whose storage is Google Cloud Storage: `cluster.storage_path=gs://...` against a
real GCS API server on loopback (fake-gcs-server, reached through STORAGE_EMULATOR_HOST), with the
default `cluster=local` (Ray Train, one worker). Ray Train writes its run state and sheepop its
shards, manifests and mirrored run files to the bucket; a resume from the bucket alone (the run
folder deleted) continues with the losses of the run that never stopped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from tests.helpers import TINY_DATA, sheepop

BUCKET = "gcs-runs"


def args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["model=tiny", "trainer=quick", "logger=none", "trainer.precision=fp32", "trainer.progress=false",
            "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.eval_every=0",
            f"trainer.max_steps={steps}", "trainer.save_every=2", *TINY_DATA,
            f"cluster.storage_path=gs://{BUCKET}/runs", "run.name=g", f"run.dir={run_dir}", *extra]


def losses(run: Path) -> dict[int, float]:
    return dict(zip(*latest_per_step(read_metrics(run), "loss")))


@pytest.fixture(scope="module")
def gcs_run(gcs, tmp_path_factory):
    gcs.bucket(BUCKET)
    run = tmp_path_factory.mktemp("gcs") / "run"
    r = sheepop("train", *args(run, 6), env=gcs.env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run


def test_checkpoints_and_run_files_land_in_the_bucket(gcs_run, gcs):
    objects = gcs.objects(BUCKET, "runs/g/")
    for step in ("step_000002", "step_000004", "step_000006"):
        ck = f"runs/g/checkpoints/{step}/"
        marker = json.loads(_read(gcs, BUCKET, ck + "done/rank_0.json"))
        assert marker["files"] and all(objects.get(ck + rel) == size for rel, (size, _) in marker["files"].items()), step
    assert {"runs/g/config.yaml", "runs/g/metrics.jsonl", "runs/g/tokenizer.json"} <= set(objects)


def test_resume_from_the_bucket_alone_continues_exactly(gcs_run, gcs, tmp_path):
    """A new run dir; the checkpoint only ever existed in the bucket (each rank stages it in RAM
    and deletes the local copy once uploaded)."""
    run = tmp_path / "resumed"
    r = sheepop("train", *args(run, 6, f"trainer.resume=gs://{BUCKET}/runs/g/checkpoints/step_000004",
                               "run.name=g2"), env=gcs.env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert next(e for e in read_metrics(run) if e.get("event") == "resume")["step"] == 4
    full, resumed = losses(gcs_run), losses(run)
    assert sorted(resumed) == [5, 6]
    assert max(abs(full[s] - resumed[s]) for s in resumed) < 1e-4


def test_a_resume_from_a_missing_checkpoint_in_the_bucket_is_one_line(gcs, tmp_path):
    r = sheepop("train", *args(tmp_path / "run", 6, f"trainer.resume=gs://{BUCKET}/runs/none", "run.name=g3"),
                env=gcs.env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"trainer.resume=gs://{BUCKET}/runs/none: nothing there in the bucket" in r.stderr.strip().splitlines()[-1]


def _read(gcs, bucket: str, name: str) -> str:
    import urllib.parse
    import urllib.request

    url = f"{gcs.endpoint}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()
