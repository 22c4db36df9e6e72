"""`sheepop submit | jobs | status | logs | stop` against a real Ray head on 127.0.0.1.

The training job is submitted by a module fixture at the start and checked by the last test, so
the other tests (bad input, a failing job, stopping a sweep) run while it trains."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR, ROOT, sheepop
from sheepop.errors import UserError

SECRET = "s3cr3t-6f1c-not-a-real-key"
DATA = ["data.max_bytes=3000000", f"data.out_dir={DATA_DIR}/stdlib-3mb-v1024"]
TINY = ["model=tiny", "trainer=quick", "logger=none", "cluster.num_workers=1", *DATA]


def one_error_line(r) -> str:
    """A user error: exit 2, exactly one line on stderr, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"^submitted (\S+)", stdout, re.M)


def client_for(head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address)


def wait_for(cond, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --------------------------------------------------------------------------------------------
# no cluster needed


def test_sweeps_expand_with_hydra_one_job_per_combination():
    from sheepop.jobs import expand, plan_jobs

    jobs = expand(["model=tiny", "trainer.lr=3e-4,1e-3", "parallelism=zero1,zero2", "run.dir=/r/x"], multirun=True)
    assert len(jobs) == 4
    assert {tuple(sorted(j)) for j in jobs} == {
        tuple(sorted(["model=tiny", "run.dir=/r/x", f"trainer.lr={lr}", f"parallelism={p}"]))
        for lr in ("0.0003", "0.001") for p in ("zero1", "zero2")}
    with pytest.raises(UserError, match="is a sweep: add -m"):
        expand(["trainer.lr=3e-4,1e-3"], multirun=False)

    # Same run.dir for every combination → numbered subfolders; a run.dir that follows the sweep stays.
    planned = plan_jobs(["model=tiny", "trainer.lr=3e-4,1e-3", "run.dir=/r/x"], multirun=True)
    assert [p["run_dir"] for p in planned] == ["/r/x/0", "/r/x/1"]
    planned = plan_jobs(["model=tiny", "trainer.lr=3e-4,1e-3", "run.dir=/r/lr${trainer.lr}"], multirun=True)
    assert [p["run_dir"] for p in planned] == ["/r/lr0.0003", "/r/lr0.001"]
    assert all(p["overrides"][0] == "cluster=ray" and p["overrides"][-1] == f"run.dir={p['run_dir']}" for p in planned)


def test_entrypoint_quotes_overrides_and_composes_back_to_the_same_config(tmp_path):
    from sheepop.config import compose
    from sheepop.jobs import entrypoint, plan_jobs

    from hydra._internal.grammar.utils import escape_special_characters

    odd_dir = tmp_path / "a b,c$(touch pwned)"
    (job,) = plan_jobs(["model=tiny", "trainer.sample_prompt='x = 1; echo hi'",
                        f"run.dir={escape_special_characters(str(odd_dir))}"], multirun=False)
    cmd = entrypoint("python", job["overrides"])
    argv = shlex.split(cmd)
    assert argv[:5] == ["python", "-m", "sheepop.cli", "train", "cluster=ray"]
    cfg = compose(argv[4:])
    assert cfg.run.dir == str(odd_dir) and cfg.trainer.sample_prompt == "x = 1; echo hi"
    r = subprocess.run(["bash", "-c", f"printf '%s\\n' {cmd.split(' ', 4)[4]}"], capture_output=True,
                                     text=True, cwd=tmp_path)
    assert not (tmp_path / "pwned").exists() and r.stdout.splitlines() == argv[4:]  # the shell runs nothing


def test_upload_excludes_vcs_outputs_shards_and_credentials(tmp_path):
    from sheepop.jobs import EXCLUDES, upload_files

    files = {
        "sheepop/cli.py": "code", "conf/config.yaml": "defaults: []", "README.md": "hi",
        ".env": f"WANDB_API_KEY={SECRET}", ".env.local": SECRET, "deploy/.envrc": SECRET,
        "credentials.json": SECRET, "gcp-service-account.json": "{}", "keys/id_rsa": SECRET, "tls/server.pem": SECRET,
        ".netrc": f"machine api.wandb.ai password {SECRET}", ".git/config": "[core]", ".venv/bin/python": "",
        "outputs/run/metrics.jsonl": "{}", "wandb/offline-run/x.wandb": "", "data/stdlib/train_000000.bin": "\0" * 64,
        "sheepop/__pycache__/cli.cpython-311.pyc": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    kept = {p.relative_to(tmp_path).as_posix() for p, _ in upload_files(tmp_path, EXCLUDES)}
    assert kept == {"sheepop/cli.py", "conf/config.yaml", "README.md"}
    # .gitignore and .rayignore are honoured as Ray honours them.
    (tmp_path / ".rayignore").write_text("README.md\n")
    kept = {p.relative_to(tmp_path).as_posix() for p, _ in upload_files(tmp_path, EXCLUDES)}
    assert kept == {"sheepop/cli.py", "conf/config.yaml", ".rayignore"}


def test_working_dir_over_ray_upload_limit_fails_before_contacting_anyone(tmp_path):
    big = tmp_path / "wd" / "corpus" / "blob.dat"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(600 * 2**20)  # sparse: 600 MiB to upload, nothing on disk
    dead = f"http://127.0.0.1:{_free_port()}"  # would fail differently if it were contacted
    r = sheepop("submit", "--address", dead, "--working-dir", str(tmp_path / "wd"), "model=tiny")
    line = one_error_line(r)
    assert "over Ray's 512.0 MiB limit" in line and "corpus/blob.dat (600.0 MiB)" in line


def test_unreachable_address_is_one_line():
    port = _free_port()
    r = sheepop("status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}")
    assert f"nothing answers at 127.0.0.1:{port}" in one_error_line(r)
    r = sheepop("submit", "model=tiny", env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert f"nothing answers at 127.0.0.1:{port}" in one_error_line(r)
    r = sheepop("jobs", "--address", "ray://127.0.0.1:10001")
    assert "use http://HOST:8265" in one_error_line(r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                *TINY, "trainer.max_steps=20", f"run.dir={run_dir}", env={"SHEEPOP_TEST_TOKEN": SECRET}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (job_id,) = submitted_ids(r.stdout)
    return {"id": job_id, "run_dir": run_dir, "wd": wd, "stdout": r.stdout, "submitted": time.time()}


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_failed_job_status_exits_nonzero(ray_head, tmp_path):
    # Valid here, fails on the cluster: the driver cannot reach this Ray address.
    dead = f"127.0.0.1:{_free_port()}"
    r = sheepop("submit", "--address", ray_head.address, *TINY, f"cluster.address={dead}", f"run.dir={tmp_path / 'r'}")
    assert r.returncode == 0, r.stderr
    (job_id,) = submitted_ids(r.stdout)
    r = sheepop("status", job_id, "--wait", "--timeout", "120", "--address", ray_head.address, timeout=150)
    assert r.returncode == 1 and f"{job_id}: FAILED" in r.stdout, r.stdout + r.stderr
    r = sheepop("status", job_id, env={"RAY_ADDRESS": ray_head.address})  # address from the environment
    assert r.returncode == 1 and "FAILED" in r.stdout
    r = sheepop("logs", job_id, "--address", ray_head.address)
    assert r.returncode == 0 and f"cluster.address={dead}: nothing answers" in r.stdout


@pytest.mark.slow
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
    wait_for(lambda: all(c.exists() for c in configs), 90, "both sweep jobs to start")
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


@pytest.mark.slow
def test_submitted_job_succeeds_with_metrics_logs_and_a_clean_upload(ray_head, training_job):
    job_id, run_dir = training_job["id"], training_job["run_dir"]
    r = sheepop("status", job_id, "--wait", "--timeout", "240", "--address", ray_head.address, timeout=260)
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
    assert "conf/config.yaml" in uploaded and "sheepop/cli.py" in uploaded
    assert not {".env", "credentials.json", "data/train_000000.bin"} & uploaded
    assert not any(u.startswith((".git/", "outputs/", "wandb/")) for u in uploaded)
    assert not any(SECRET in (pkg / u).read_text(errors="replace") for u in uploaded)


def test_submit_refuses_a_run_that_cannot_fit_unless_forced():
    """The plan's memory check runs before anything is contacted (--dry-run contacts nothing)."""
    big = ["model=llama-7b", "cluster.gpu=l4", "cluster.num_workers=8", "trainer.micro_batch_size=1",
           "trainer.global_batch_size=16", "run.dir=/tmp/sheepop-never-written"]
    r = sheepop("submit", "--dry-run", *big)
    assert r.returncode == 2 and "does not fit" in r.stderr and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = sheepop("submit", "--dry-run", "--force", *big)
    assert r.returncode == 0, r.stderr
    assert "sheepop.cli train cluster=ray model=llama-7b" in r.stdout
