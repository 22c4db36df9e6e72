"""A run whose disk fills up: the save that does not fit fails in one line naming the path, the
bytes needed and the bytes free; the previous checkpoint stays complete and is the resume point.
Uses a real small filesystem (tmpfs, mounted by the test: needs root; skipped otherwise)."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from sheepop.train import checkpoint_files
from tests.helpers import one_error_line, sheepop, tiny_overrides


@pytest.fixture()
def small_fs():
    mnt = Path(tempfile.mkdtemp(prefix="sheepop-smallfs-"))
    # The tiny model's checkpoint is ~6.5 MB: room for the run's files and one checkpoint, not two.
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): the full-disk test needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_fs):
    run = small_fs / "run"
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", "trainer.save_every=3", "trainer.progress=false",
                                         "trainer.eval_every=0"))
    line = one_error_line(r)
    assert "not enough disk space for checkpoint step_000006" in line and str(run / "checkpoints") in line
    assert "free, a checkpoint needs about" in line
    ckpts = checkpoint_files.list_checkpoints(str(run / "checkpoints"))
    assert [Path(c).name for c in ckpts] == ["step_000003"]
    assert checkpoint_files.problem(ckpts[0]) is None  # complete and intact: the resume point


def test_no_room_for_even_one_checkpoint_fails_before_training(small_fs):
    filler = small_fs / "filler"
    filler.write_bytes(b"0" * (7 * 2**20))  # leaves ~2 MB
    run = small_fs / "run"
    line = one_error_line(sheepop("train", *tiny_overrides(run, "trainer.max_steps=6")))
    assert "not enough disk space for the first checkpoint" in line
    assert not (run / "metrics.jsonl").exists()  # no step ran
