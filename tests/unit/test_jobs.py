"""`sheepop submit | jobs | status | logs | stop` without a cluster: sweeps, the entrypoint's
quoting, what is uploaded, and the checks that fail before anything is contacted. Against a real
Ray head: tests/integration/test_jobs.py."""
from __future__ import annotations

import shlex
import subprocess

import pytest

from sheepop.errors import UserError
from tests.helpers import free_port, one_error_line, sheepop

SECRET = "s3cr3t-6f1c-not-a-real-key"


def test_sweeps_expand_with_hydra_one_job_per_combination():
    from sheepop.cli.jobs import expand, plan_jobs

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
    # With object storage, jobs that would share <storage_path>/<run.name> get a run.name each.
    planned = plan_jobs(["model=tiny", "trainer.lr=3e-4,1e-3", "run.dir=/r/x", "cluster.storage_path=s3://b/runs",
                         "run.name=lr"], multirun=True)
    assert [[o for o in p["overrides"] if o.startswith("run.name=")] for p in planned] == [["run.name=lr-0"],
                                                                                         ["run.name=lr-1"]]
    planned = plan_jobs(["model=tiny", "trainer.lr=3e-4,1e-3", "run.dir=/r/x", "cluster.storage_path=s3://b/runs",
                         "run.name=lr${trainer.lr}"], multirun=True)
    assert all(not any(o.startswith("run.name=lr-") for o in p["overrides"]) for p in planned)


def test_entrypoint_quotes_overrides_and_composes_back_to_the_same_config(tmp_path):
    from sheepop.config import compose
    from sheepop.cli.jobs import entrypoint, plan_jobs

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
    from sheepop.cli.jobs import EXCLUDES, upload_files

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
    dead = f"http://127.0.0.1:{free_port()}"  # would fail differently if it were contacted
    r = sheepop("submit", "--address", dead, "--working-dir", str(tmp_path / "wd"), "model=tiny")
    line = one_error_line(r)
    assert "over Ray's 512.0 MiB limit" in line and "corpus/blob.dat (600.0 MiB)" in line


def test_unreachable_address_is_one_line():
    port = free_port()
    r = sheepop("status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}")
    assert f"nothing answers at 127.0.0.1:{port}" in one_error_line(r)
    r = sheepop("submit", "model=tiny", env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert f"nothing answers at 127.0.0.1:{port}" in one_error_line(r)
    r = sheepop("jobs", "--address", "ray://127.0.0.1:10001")
    assert "use http://HOST:8265" in one_error_line(r)


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


def test_dry_run_lists_every_file_it_would_upload_before_the_entrypoint(tmp_path):
    wd = tmp_path / "wd"
    files = {"train.py": "x" * 10, "conf/a b.yaml": "", "notes/big.txt": "y" * 3000,
             **{f"many/f{i:03d}.py": "pass\n" for i in range(250)}}  # a long list is printed in full
    for rel, text in files.items():
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text(text)
    (wd / ".env").write_text(f"KEY={SECRET}")  # excluded by name: not listed
    r = sheepop("submit", "--dry-run", "--working-dir", str(wd), "model=tiny", "run.dir=/tmp/sheepop-never-written")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"working dir {wd}: {len(files)} files, ")
    listed = lines[1:1 + len(files)]
    assert [ln[14:] for ln in listed] == sorted(files)  # "  <size, 10 wide>  <path relative to the working dir>"
    sizes = {ln[14:]: ln[:12].strip() for ln in listed}
    assert (sizes["train.py"], sizes["conf/a b.yaml"], sizes["notes/big.txt"]) == ("10 B", "0 B", "2.9 KiB")
    assert lines[1 + len(files):] == ["python -m sheepop.cli train cluster=ray model=tiny "
                                      "run.dir=/tmp/sheepop-never-written"]


def test_the_wandb_key_is_forwarded_only_to_jobs_that_log_to_wandb_online(tmp_path):
    """A forwarded value lands in Ray's job table and its runtime-env agent's log on the head node:
    the key goes only where a job needs it (a named --env still forwards it)."""
    (tmp_path / "wd").mkdir()
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "", "NETRC": str(tmp_path / "no-netrc")}
    common = ["submit", "--dry-run", "--working-dir", str(tmp_path / "wd"), "model=tiny", "run.dir=/tmp/never"]
    for overrides, named, forwarded in [(["logger=wandb", "logger.mode=offline"], [], False),
                                        (["logger=none"], [], False),
                                        (["logger=wandb"], [], True),  # auto with a key: online
                                        (["logger=none"], ["--env", "WANDB_API_KEY"], True)]:
        r = sheepop(*common[:2], *named, *common[2:], *overrides, env=env)
        assert r.returncode == 0, r.stderr
        assert ("WANDB_API_KEY" in r.stdout.splitlines()[0]) is forwarded, (overrides, r.stdout.splitlines()[0])
