"""A secret in the environment (here WANDB_API_KEY, a marker value) reaches the workers without
being written anywhere: no file under the run dir, Ray's temp dir (session logs, runtime-env
agent logs), the data dir or W&B's folder holds it after a real cluster=local run."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.helpers import TINY_DATA, sheepop

MARKER = "sheepopmarkersecret" + "0123456789abcdef01234567"  # 43 chars, built so no file holds it whole


def files_holding(root: Path, needle: bytes) -> list[Path]:
    found = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                found.append(p)
        except OSError:
            pass
    return found


def test_marker_secret_lands_in_no_file(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    run, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    try:
        r = sheepop("train", "model=tiny", "trainer=quick", "cluster=local", "logger=wandb", "logger.mode=offline",
                    f"run.dir={run}", *TINY_DATA, "trainer.max_steps=4", "trainer.progress=false",
                    env={"WANDB_API_KEY": MARKER, "RAY_TMPDIR": str(ray_tmp), "WANDB_DIR": str(wandb_dir)})
        assert r.returncode == 0, r.stderr[-3000:]
        assert (run / "logs" / "rank0.log").is_file() and any(ray_tmp.rglob("*.log"))  # the places searched exist
        data_dir = Path(TINY_DATA[1].split("=", 1)[1])
        leaks = [p for root in (run, ray_tmp, data_dir, wandb_dir) for p in files_holding(root, MARKER.encode())]
        assert not leaks, leaks
        assert MARKER not in r.stdout + r.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
