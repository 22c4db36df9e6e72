"""A real diverging run (learning rate far too high): it stops with one line and exit 2 instead of
finishing, and no checkpoint of the diverged model displaces the last good one."""
from __future__ import annotations

from pathlib import Path

from sheepop.monitor.metrics_file import read_metrics
from sheepop.train import checkpoint_files
from tests.helpers import one_error_line, sheepop, tiny_overrides


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, "trainer.lr=30", "trainer.min_lr=1", "trainer.warmup_steps=0",
                                         "trainer.max_steps=20", "trainer.save_every=1", "trainer.keep_checkpoints=1",
                                         "trainer.eval_every=0", "trainer.progress=false"))
    line = one_error_line(r)
    assert "training diverged at step" in line and "lower trainer.lr=30" in line
    rows = read_metrics(run)
    diverged = [e for e in rows if e.get("event") == "diverged"]
    assert len(diverged) == 1 and diverged[0]["step"] < 20
    skipped = {e["step"] for e in rows if e.get("event") == "checkpoint_skipped"}
    saved = [Path(c).name for c in checkpoint_files.list_checkpoints(str(run / "checkpoints"))]
    assert saved == ["step_000001"]  # the only step before the loss blew up; keep_checkpoints=1 kept it
    assert skipped == set(range(2, diverged[0]["step"]))
    assert checkpoint_files.problem(str(run / "checkpoints" / "step_000001")) is None
