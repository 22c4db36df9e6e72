"""Where a checkpoint bound for object storage is written before its upload (cluster.checkpoint_staging),
how many CPUs sheepop sees (the process's affinity, not the machine's count), and where a resume's
universal conversion goes."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sheepop.config import compose
from sheepop.errors import UserError
from sheepop.train import checkpoint

S3_RUN = ["model=tiny", "cluster.storage_path=s3://bucket/runs"]


def test_auto_stages_in_ram_when_it_fits(tmp_path, monkeypatch):
    ram = tmp_path / "shm"
    ram.mkdir()
    monkeypatch.setattr(checkpoint, "RAM_STAGING", ram)
    cfg = compose(S3_RUN)
    assert checkpoint.staging_dir(cfg) == ram
    # A model whose checkpoint (twice over, + 1 GiB) exceeds what RAM has: the temp dir on disk.
    monkeypatch.setattr(checkpoint, "estimated_bytes", lambda cfg: checkpoint._memory_available())
    assert checkpoint.staging_dir(cfg) == Path(tempfile.gettempdir())
    monkeypatch.setattr(checkpoint, "RAM_STAGING", tmp_path / "no-such-tmpfs")  # macOS: no /dev/shm
    monkeypatch.setattr(checkpoint, "estimated_bytes", lambda cfg: 1)
    assert checkpoint.staging_dir(cfg) == Path(tempfile.gettempdir())


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this OS")
def test_auto_is_dev_shm_on_linux_for_a_small_model():
    if checkpoint._memory_available() < 4 * 2**30:
        pytest.skip("less than 4 GiB of memory available")
    assert checkpoint.staging_dir(compose(S3_RUN)) == Path("/dev/shm")


def test_an_explicit_folder_is_used(tmp_path):
    cfg = compose([*S3_RUN, f"cluster.checkpoint_staging={tmp_path}/stage"])
    assert checkpoint.staging_dir(cfg) == tmp_path / "stage"


def test_a_uri_is_refused():
    with pytest.raises(UserError, match=r"cluster.checkpoint_staging=s3://b/x; valid: auto, or a local folder"):
        compose([*S3_RUN, "cluster.checkpoint_staging=s3://b/x"])


def test_orphans_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    orphan = tmp_path / f"sheepop-step_000010-r0-p{dead}-abc123"
    live = tmp_path / f"sheepop-step_000010-r1-p{os.getpid()}-def456"
    other = tmp_path / "sheepop-step_notours"
    for d in (orphan, live, other):
        (d / "global_step").mkdir(parents=True)
    checkpoint._remove_orphans(tmp_path)
    assert not orphan.exists() and live.exists() and other.exists()


def test_cpus_follow_the_affinity():
    """`taskset -c 0 sheepop train` on a bigger machine: one CPU, so one torch thread per worker."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs sched_setaffinity and 2+ CPUs")
    code = ("import os; os.sched_setaffinity(0, {0});"
            "from sheepop.perf import usable_cpus; from sheepop.config import compose;"
            "from sheepop.driver.ray_runner import cpus_per_worker;"
            "print(usable_cpus(), cpus_per_worker(compose(['model=tiny', 'cluster=local'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]


def test_universal_conversions_go_into_the_resuming_run():
    """A resume's own checkpoint converts to <run>/universal/step_N; another run's (a branch) to a name
    of its own in the resuming run, never beside the source, locally and in a bucket."""
    from sheepop.train.checkpoint import universal_location

    own = universal_location("/runs/a/checkpoints/step_000006", "/runs/a")
    assert own == "/runs/a/universal/step_000006"
    branch = universal_location("/runs/a/checkpoints/step_000006", "/runs/b")
    assert branch.startswith("/runs/b/universal/step_000006-from-") and branch != own
    assert universal_location("/runs/c/checkpoints/step_000006", "/runs/b") != branch  # one per source
    assert universal_location("s3://bk/runs/a/checkpoints/step_000006/", "s3://bk/runs/a") == \
        "s3://bk/runs/a/universal/step_000006"
    assert universal_location("s3://bk/runs/a/checkpoints/step_000006", "s3://bk/runs/b").startswith(
        "s3://bk/runs/b/universal/step_000006-from-")
