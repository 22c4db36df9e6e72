"""A checkpoint counts only when complete and intact: every rank's manifest (done/rank_R.json, sizes
and sha256) is there and every file matches it. A truncated newest checkpoint is skipped, in one
line, and the resume falls back to the one before; generate refuses a damaged one in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sheepop.monitor.metrics_file import read_metrics
from sheepop.train import checkpoint_files
from tests.helpers import one_error_line, sheepop, tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("integrity") / "run"
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", "trainer.save_every=3", "trainer.progress=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_each_checkpoint_carries_a_manifest_of_its_files(run):
    ckpt = run / "checkpoints" / "step_000006"
    manifest = json.loads((ckpt / "done" / "rank_0.json").read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and "done" not in p.parts}
    assert set(manifest) == on_disk
    assert all(size == (ckpt / f).stat().st_size for f, (size, _) in manifest.items())
    assert checkpoint_files.problem(str(ckpt)) is None


def test_truncated_newest_checkpoint_is_skipped_on_resume(run):
    newest = run / "checkpoints" / "step_000006"
    shard = next((newest / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "bytes, its manifest says" in checkpoint_files.problem(str(newest))
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=9", "trainer.save_every=3", "trainer.progress=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [ln for ln in r.stdout.replace("\n ", " ").splitlines() if "skipping checkpoint" in ln]
    assert len(skipped) == 1 and "step_000006" in skipped[0] and "its manifest says" in skipped[0]
    resume = [e for e in read_metrics(run) if e.get("event") == "resume"][-1]
    assert resume["step"] == 3  # fell back to the intact one
    assert newest.is_dir()  # nothing the user had is deleted by the resume itself


def test_generate_refuses_a_damaged_checkpoint_in_one_line(run):
    ckpt = run / "checkpoints" / "step_000009"
    model_file = ckpt / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 can tell
    model_file.write_bytes(bytes(data))
    line = one_error_line(sheepop("generate", f"run.dir={ckpt}", "max_new_tokens=2"))
    assert "does not match its manifest" in line and "mp_rank_00_model_states.pt" in line


def test_checkpoint_of_an_older_sheepop_is_accepted_after_a_size_check(run, tmp_path):
    import shutil

    old = tmp_path / "step_000003"
    shutil.copytree(run / "checkpoints" / "step_000003", old)
    shutil.rmtree(old / "done")  # what sheepop wrote before manifests existed
    assert checkpoint_files.problem(str(old)) is None
    (next((old / "ds").glob("*optim_states.pt"))).write_bytes(b"")
    assert "is empty" in checkpoint_files.problem(str(old))
