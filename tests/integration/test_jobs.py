"""`sheepop submit | jobs | status | logs | stop` against a real Ray head on 127.0.0.1 (the
session's `ray_head` fixture). What needs no cluster: tests/unit/test_jobs.py.

The training job is submitted by a module fixture at the start and checked by the last test, so
the other tests (bad input, a failing job, stopping a sweep) run while it trains."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_DATA, free_port, one_error_line, sheepop, wait_for

SECRET = "s3cr3t-6f1c-not-a-real-key"
TINY = ["model=tiny", "trainer=quick", "logger=none", "cluster.num_workers=1", *TINY_DATA]


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"^submitted (\S+)", stdout, re.M)


def client_for(head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address)


# --------------------------------------------------------------------------------------------
# against the Ray head


@pytest.fixture(scope="module")
def training_job(ray_head, tmp_path_factory):
    """Submit the tiny model from a working dir that also holds things that must never be
    uploaded (a .env with a key, credentials, .git, old outputs, shards)."""
    base = tmp_path_factory.mktemp("jobs")
    wd = base / "project"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "sheepop", wd / "sheepop", ignore=ignore)
    shutil.copytree(ROOT / "conf", wd / "conf", ignore=ignore)
    planted = {".env": f"SHEEPOP_TEST_TOKEN={SECRET}", "credentials.json": json.dumps({"key": SECRET}),
               ".git/config": SECRET, "outputs/old/metrics.jsonl": SECRET, "wandb/settings": SECRET,
               "data/train_000000.bin": SECRET}
    for rel, text in planted.items():
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text(text)
    run_dir = base / "run"
    r = sheepop("submit", "--address", ray_head.address, "--working-dir", str(wd), "--env", "SHEEPOP_TEST_TOKEN",
                *TINY, "trainer.max_steps=20", f"run.dir={run_dir}", env={"SHEEPOP_TEST_TOKEN": SECRET})
    assert r.returncode == 0, r.stdout + r.stderr
    (job_id,) = submitted_ids(r.stdout)
    return {"id": job_id, "run_dir": run_dir, "wd": wd, "stdout": r.stdout, "submitted": time.time()}


def test_submit_prints_id_and_dashboard_url(training_job, ray_head):
    out = training_job["stdout"]
    assert f"dashboard: {ray_head.address}/#/jobs/{training_job['id']}" in out
    assert f"run.dir={training_job['run_dir']}" in out
    assert "forwarding env: SHEEPOP_TEST_TOKEN" in out and SECRET not in out
    info = client_for(ray_head).get_job_info(training_job["id"])
    assert info.entrypoint.startswith("python -m sheepop.cli train cluster=ray model=tiny")
    assert SECRET not in info.entrypoint
    # What docs/cluster.md warns about: Ray keeps forwarded values in the job's runtime_env, which
    # the dashboard and the jobs API show to anyone who can reach them.
    assert info.runtime_env["env_vars"]["SHEEPOP_TEST_TOKEN"] == SECRET


def test_bad_override_and_unknown_job_never_touch_the_cluster(ray_head, training_job):
    before = len(client_for(ray_head).list_jobs())
    r = sheepop("submit", "--address", ray_head.address, "model=tiny", "trainer.max_stepz=3")
    assert "unknown key 'trainer.max_stepz'" in one_error_line(r)
    r = sheepop("submit", "--address", ray_head.address, "model=tiny", "trainer.lr=1e-3,3e-3")
    assert "add -m" in one_error_line(r)
    r = sheepop("submit", "--address", ray_head.address, "--env", "SHEEPOP_UNSET_VAR", "model=tiny")
    assert "SHEEPOP_UNSET_VAR: not set" in one_error_line(r)
    assert len(client_for(ray_head).list_jobs()) == before

    for cmd in ("status", "logs", "stop"):
        r = sheepop(cmd, "raysubmit_doesnotexist", "--address", ray_head.address)
        assert one_error_line(r).endswith(f"no job 'raysubmit_doesnotexist' at {ray_head.address}; "
                                          "`sheepop jobs` lists them")


def test_failed_job_status_exits_nonzero(ray_head, tmp_path):
    # Valid here, fails on the cluster: the driver cannot reach this Ray address.
    dead = f"127.0.0.1:{free_port()}"
    r = sheepop("submit", "--address", ray_head.address, *TINY, f"cluster.address={dead}", f"run.dir={tmp_path / 'r'}")
    assert r.returncode == 0, r.stderr
    (job_id,) = submitted_ids(r.stdout)
    # --timeout: a hang guard (the driver fails within a minute normally), well inside the CLI's own.
    r = sheepop("status", job_id, "--wait", "--timeout", "600", "--address", ray_head.address)
    assert r.returncode == 1 and f"{job_id}: FAILED" in r.stdout, r.stdout + r.stderr
    r = sheepop("status", job_id, env={"RAY_ADDRESS": ray_head.address})  # address from the environment
    assert r.returncode == 1 and "FAILED" in r.stdout
    r = sheepop("logs", job_id, "--address", ray_head.address)
    assert r.returncode == 0 and f"cluster.address={dead}: nothing answers" in r.stdout


def test_multirun_submits_one_job_per_value_and_stop_stops_them(ray_head, tmp_path, training_job):
    sweep_dir = tmp_path / "sweep"
    r = sheepop("submit", "--address", ray_head.address, "-m", "model=tiny", "trainer=quick", "logger=none",
                "cluster.num_workers=1", "trainer.max_steps=100000", "trainer.lr=1e-3,3e-3", f"run.dir={sweep_dir}",
                "data.max_bytes=3000000", f"data.out_dir={tmp_path / 'data'}")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = submitted_ids(r.stdout)
    assert len(ids) == 2 and len(set(ids)) == 2
    # Each job's driver has started (it writes config.yaml first) and is working on a long run.
    configs = [sweep_dir / str(n) / "config.yaml" for n in range(2)]
    wait_for(lambda: all(c.exists() for c in configs), 600, "both sweep jobs to start")  # a hang guard
    import yaml

    assert sorted(yaml.safe_load(c.read_text())["trainer"]["lr"] for c in configs) == [1e-3, 3e-3]
    for job_id in ids:
        assert client_for(ray_head).get_job_status(job_id).value == "RUNNING"
        r = sheepop("stop", job_id, "--address", ray_head.address)
        assert r.returncode == 0 and r.stdout.strip() == f"{job_id}: STOPPED", r.stdout + r.stderr
        r = sheepop("status", job_id, "--address", ray_head.address)
        assert r.returncode == 3 and f"{job_id}: STOPPED" in r.stdout
    r = sheepop("stop", ids[0], "--address", ray_head.address)
    assert r.returncode == 0 and "already STOPPED" in r.stdout
    r = sheepop("jobs", "--address", ray_head.address)
    assert r.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert rows[ids[0]] == rows[ids[1]] == "STOPPED" and training_job["id"] in rows


def test_submitted_job_succeeds_with_metrics_logs_and_a_clean_upload(ray_head, training_job):
    job_id, run_dir = training_job["id"], training_job["run_dir"]
    # --timeout: a hang guard (a 20-step tiny run), well inside the CLI call's own.
    r = sheepop("status", job_id, "--wait", "--timeout", "800", "--address", ray_head.address)
    logs = client_for(ray_head).get_job_logs(job_id)
    assert r.returncode == 0 and f"{job_id}: SUCCEEDED" in r.stdout, r.stdout + r.stderr + logs[-3000:]
    print(f"training job: {time.time() - training_job['submitted']:.0f} s from submission to SUCCEEDED")

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "event" not in row and row.get("loss") is not None]
    assert steps[-1]["step"] == 20 and steps[-1]["loss"] < steps[0]["loss"]
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "sample.txt").is_file()
    assert SECRET not in (run_dir / "config.yaml").read_text()

    r = sheepop("logs", job_id, "--address", ray_head.address)
    assert r.returncode == 0
    loss_lines = re.findall(r"^step (\d+)/20\s+loss \d+\.\d+", r.stdout, re.M)
    assert loss_lines and loss_lines[-1] == "20", r.stdout[-3000:]
    r = sheepop("logs", job_id, "--follow", "--address", ray_head.address)  # a finished job: replay, exit 0
    assert r.returncode == 0 and "step 20/20" in r.stdout

    # The package Ray unpacked on the "head node" holds the code and conf/, and nothing planted.
    uri = client_for(ray_head).get_job_info(job_id).runtime_env["working_dir"]  # gcs://_ray_pkg_<hash>.zip
    (pkg,) = ray_head.temp_dir.glob(f"session_latest/runtime_resources/working_dir_files/{Path(uri).stem}")
    uploaded = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()}
    assert "conf/config.yaml" in uploaded and "sheepop/cli/__init__.py" in uploaded
    assert not {".env", "credentials.json", "data/train_000000.bin"} & uploaded
    assert not any(u.startswith((".git/", "outputs/", "wandb/")) for u in uploaded)
    assert not any(SECRET in (pkg / u).read_text(errors="replace") for u in uploaded)
