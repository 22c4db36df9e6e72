"""Graceful stops: Ctrl-C to a 2-worker `sheepop train` and `sheepop stop` of a submitted job
each save a checkpoint at the next step and exit with STOPPED_EXIT_CODE; the resumed run continues
the losses of a run that never stopped. Real Ray (a local one, and the session's head), real DeepSpeed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.train.stop import STOPPED_EXIT_CODE
from tests.helpers import ROOT, TINY_DATA, sheepop, tiny_overrides, wait_for

FP32 = ["trainer.precision=fp32", "trainer.save_every=0", "trainer.eval_every=0", "trainer.progress=false",
        "trainer.max_steps=80", "trainer.global_batch_size=8", "trainer.micro_batch_size=4"]


def logged_step(run: Path) -> int:
    rows = [r for r in read_metrics(run) if "loss" in r]
    return rows[-1]["step"] if rows else 0


def stop_events(run: Path) -> list[dict]:
    return [e for e in read_metrics(run) if e.get("event") == "stop"]


def test_sigterm_and_sheepop_stop_save_and_resume_continues_the_losses(tmp_path, ray_head):
    straight = tmp_path / "straight"
    r = sheepop("train", *tiny_overrides(straight, *FP32))
    assert r.returncode == 0, r.stderr[-3000:]

    # 1. Ctrl-C at a terminal to a 2-worker Ray run: SIGINT to its whole process group (the driver
    # and the local Ray's processes). Ray Train's own SIGINT handler, had it stayed, aborts the run
    # with no checkpoint (compat.ray_torch_trainer keeps sheepop's). SIGTERM, what Slurm and
    # Kubernetes send, takes the same path: step 2, and test_multinode's drained node.
    run = tmp_path / "run"
    base = ["model=tiny", "trainer=quick", "logger=none", f"run.dir={run}", *TINY_DATA, *FP32]
    args = [*base, "cluster=local", "cluster.num_workers=2"]
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train", *args], cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: logged_step(run) >= 5 or p.poll() is not None, 600, "step 5")  # a hang guard
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == STOPPED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "SIGINT: stopping" in out and "stopped at step" in out, out + err
    (stop,) = stop_events(run)
    assert "SIGINT" in stop["reason"] and 5 <= stop["step"] < 80
    meta = json.loads((run / "checkpoints" / f"step_{stop['step']:06d}" / "meta.json").read_text())
    assert meta["step"] == stop["step"] and meta["world_size"] == 2

    # 2. The same run resumed as a Ray Job, then `sheepop stop` (Ray Jobs' SIGTERM to the entrypoint).
    first = stop["step"]
    # An evaluation every 2 steps slows the job (not its losses) so that it cannot finish its 70 steps
    # in the seconds `sheepop stop` takes to reach it: without it a fast machine raced past the stop.
    r = sheepop("submit", "--address", ray_head.address, "--stop-grace", "120", *base, "cluster.num_workers=2",
                "trainer.eval_every=2")
    assert r.returncode == 0, r.stdout + r.stderr
    (job_id,) = re.findall(r"^submitted (\S+)", r.stdout, re.M)
    wait_for(lambda: logged_step(run) >= first + 5, 600, "the job to train 5 steps")  # a hang guard
    r = sheepop("stop", job_id, "--address", ray_head.address)
    assert r.returncode == 0 and r.stdout.strip() == f"{job_id}: STOPPED", r.stdout + r.stderr
    stops = stop_events(run)
    assert len(stops) == 2 and stops[1]["step"] > first + 4 and "SIGTERM" in stops[1]["reason"]
    assert (run / "checkpoints" / f"step_{stops[1]['step']:06d}" / "meta.json").is_file()

    # Both resumes continued the uninterrupted run: every step logged equals it.
    s_steps, s_loss = latest_per_step(read_metrics(straight), "loss")
    i_steps, i_loss = latest_per_step(read_metrics(run), "loss")
    assert i_steps == s_steps[:len(i_steps)] and len(i_steps) >= stops[1]["step"]
    diff = max(abs(a - b) for a, b in zip(s_loss, i_loss))
    assert diff < 1e-4, diff
