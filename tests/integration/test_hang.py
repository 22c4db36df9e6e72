"""A rank that hangs (debug.hang_rank=1 debug.hang_at_step=5) on 2 Ray workers: the watchdog
writes both ranks' stacks and a `hang` event naming the slow rank, aborts the group, and Ray
Train's restart resumes from the last checkpoint and finishes. The watchdog's timing rules:
tests/unit/test_watchdog.py."""
from __future__ import annotations

import json

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from tests.helpers import ROOT, sheepop, tiny_overrides

TIMEOUT_S = 10  # trainer.hang_timeout_s here (the run ends within pytest's integration timeout, not Ray's 30 minutes)


def test_hung_rank_is_reported_and_the_run_restarts_from_its_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, "cluster=local", "cluster.num_workers=2", "cluster.max_failures=1",
                                         "trainer.max_steps=12", "trainer.save_every=2", "trainer.eval_every=0",
                                         "trainer.precision=fp32", "trainer.progress=false",
                                         f"trainer.hang_timeout_s={TIMEOUT_S}", "debug.hang_rank=1",
                                         "debug.hang_at_step=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run)
    (hang,) = [e for e in rows if e.get("event") == "hang"]
    assert hang["step"] == 4 and hang["slow_ranks"] == [1] and hang["waited_s"] >= TIMEOUT_S
    folder = run / "hangs" / "attempt0-step4"
    assert hang["dir"] == str(folder)
    stacks = {rank: (folder / f"rank{rank}.txt").read_text() for rank in (0, 1)}
    # Rank 1 sat in the loop's injected sleep; rank 0 elsewhere (waiting for rank 1's gradients).
    loop = (ROOT / "sheepop" / "train" / "loop.py").read_text().splitlines()
    sleep_line = next(n for n, line in enumerate(loop, 1) if "time.sleep(10**7)" in line)
    where = f'loop.py", line {sleep_line} in _train'
    assert where in stacks[1] and where not in stacks[0], stacks[1][-3000:]
    assert json.loads((folder / "summary_rank1.json").read_text())["slow_ranks"] == [1]
    (resume,) = [e for e in rows if e.get("event") == "resume"]
    assert resume["attempt"] == 1 and resume["step"] == 4 and resume["checkpoint"].endswith("step_000004")
    steps, _ = latest_per_step(rows, "loss")
    assert steps == list(range(1, 13))
