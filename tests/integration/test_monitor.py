"""Monitoring of real training runs: W&B offline runs read back with W&B's own reader, one W&B
run across a resume, MFU on CPU, the live view in and out of a terminal. The metrics readers,
the sparkline, `sheepop watch` and the GPU peak table: tests/unit/test_monitor.py.

One interrupted-and-resumed run (20 steps, then on to 40 in a new process) is shared by the
tests of this module. W&B runs offline for real; its .wandb files are read with `wandb leet
inspect --json` (W&B's transaction-log reader), never with our metrics.jsonl.
"""
from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sheepop.monitor.metrics_file import read_metrics
from tests.helpers import ROOT, TINY_DATA, sheepop

SECRET = "sk-monitor-test-0123456789abcdef"  # a fake W&B key: must land in no file of the run


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny", "trainer=quick", "cluster=process", "logger=wandb", "logger.mode=offline",
            "logger.tags=[test,monitor]", f"run.dir={run_dir}", *TINY_DATA, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # The CPU peak probe caches here, not in the home directory.
    return {"SHEEPOP_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "WANDB_API_KEY": SECRET}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, env):
    """A run interrupted at step 20 (max_steps=20) and resumed to 40 in a second process."""
    run = tmp_path_factory.mktemp("monitor") / "run"
    first = sheepop("train", *overrides(run, "trainer.max_steps=20"), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    meta_20 = json.loads((run / "checkpoints/step_000020/meta.json").read_text())
    second = sheepop("train", *overrides(run, "trainer.max_steps=40", "trainer.resume=auto"), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"run": run, "first": first, "second": second, "meta_20": meta_20}


def wandb_records(run_file: Path) -> list[dict]:
    """The records of a .wandb transaction log, decoded by W&B's own CLI."""
    r = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                       capture_output=True, text=True, timeout=300)  # a hang guard
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


_records_cache: dict[Path, list] = {}


def offline_runs(run: Path) -> list[tuple[str, list[dict]]]:
    """(run id, records) per offline W&B run dir, oldest first."""
    if run in _records_cache:
        return _records_cache[run]
    out = _records_cache[run] = []
    for d in sorted((run / "wandb").glob("offline-run-*")):
        log = next(d.glob("run-*.wandb"))
        recs = wandb_records(log)
        # A killed process may leave its log empty; W&B names the file after the run id too.
        run_id = next((r["run"]["run_id"] for r in recs if r["type"] == "run"), log.stem.removeprefix("run-"))
        out.append((run_id, recs))
    return out


def history(recs: list[dict]) -> list[tuple[int, dict]]:
    return [(int(r["history"]["step"]["num"]), r["history"]["item"]) for r in recs if r["type"] == "history"]


def test_wandb_offline_run_has_train_loss_at_every_logged_step(resumed):
    runs = offline_runs(resumed["run"])
    hist = [h for _, recs in runs for h in history(recs)]
    loss = {step: item["train/loss"] for step, item in hist if "train/loss" in item}
    assert sorted(loss) == list(range(1, 41))  # log_every=1: every optimizer step
    values = [loss[s] for s in sorted(loss)]
    assert statistics.mean(values[-5:]) < statistics.mean(values[:5]) - 0.5, values  # learning
    # Every metric family of the issue reaches W&B.
    keys = set().union(*(item for _, item in hist))
    for key in ("train/lr", "train/grad_norm", "train/tokens", "perf/tokens_per_sec", "perf/mfu", "perf/step_time",
                "sys/mem_allocated", "val/loss", "val/ppl"):
        assert key in keys, key
    val_steps = sorted(step for step, item in hist if "val/loss" in item)
    assert val_steps == [0, 10, 20, 30, 40]


def test_resume_continues_the_same_wandb_run_with_monotonic_steps(resumed):
    runs = offline_runs(resumed["run"])
    assert len(runs) == 2  # one offline run dir per process
    ids = {run_id for run_id, _ in runs}
    assert ids == {resumed["meta_20"]["wandb_id"]}, ids  # the id stored in the checkpoint
    final_meta = json.loads((resumed["run"] / "checkpoints/step_000040/meta.json").read_text())
    assert final_meta["wandb_id"] == resumed["meta_20"]["wandb_id"]
    steps = [step for _, recs in runs for step, _ in history(recs)]
    assert steps == sorted(set(steps)), steps  # strictly increasing across the resume
    assert history(runs[1][1])[0][0] == 21


def test_run_killed_before_its_first_checkpoint_continues_its_wandb_run(tmp_path, env):
    """SIGKILL before any checkpoint (nothing to resume from): running the command again starts
    from step 0 and logs to the same W&B run."""
    run = tmp_path / "run"
    args = overrides(run, "trainer.max_steps=30", "trainer.save_every=0", "trainer.eval_every=0",
                     "trainer.progress=false")
    # 30 steps: the kill at step 4 must come long before the run's only checkpoint (its last step), however fast
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train", *args], cwd=ROOT, env={**os.environ, **env},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a hang guard: step 4 comes within a minute normally
    while (time.monotonic() < deadline and p.poll() is None
           and not any(r.get("step", 0) >= 4 for r in read_metrics(run) if "loss" in r)):
        time.sleep(0.05)
    p.kill()
    p.wait(timeout=60)
    assert any(r.get("step", 0) >= 4 for r in read_metrics(run) if "loss" in r), "the run never reached step 4"
    assert not list(run.glob("checkpoints/*/meta.json"))
    r = sheepop("train", *args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = offline_runs(run)
    assert len(runs) == 2 and len({run_id for run_id, _ in runs}) == 1, [i for i, _ in runs]
    assert json.loads((run / "checkpoints/step_000030/meta.json").read_text())["wandb_id"] == runs[0][0]
    # The killed process's file may hold steps 0-4 or nothing (unflushed); the second logs every
    # step it computed, so W&B has them all either way (on sync it ignores steps it already has).
    assert [step for step, _ in history(runs[1][1])] == list(range(0, 31))  # 0: the first validation


def test_wandb_gets_config_tags_and_samples_but_no_secret(resumed):
    run = resumed["run"]
    _, recs = offline_runs(run)[0]
    run_rec = next(r["run"] for r in recs if r["type"] == "run")
    cfg = run_rec["config"]["update"]
    assert cfg["model"]["d_model"] == 96 and cfg["tokenizer"]["vocab_size"] == 1024  # resolved, not masked
    assert cfg["trainer"]["max_steps"] == 20
    assert set(run_rec["tags"]) == {"test", "monitor"}
    job = next(r["config"]["update"]["job"] for r in recs if r["type"] == "config" and "job" in r["config"]["update"])
    assert job["world_size"] == 1 and job["flops_per_token"] > 0
    # Generated samples: a W&B table at each eval, its rows accumulating.
    tables = {step: item for step, item in history(recs) if item.get("samples._type") == "table-file"}
    assert sorted(tables) == [10, 20]
    table = json.loads((sorted((run / "wandb").glob("offline-run-*"))[0] / "files" / tables[20]["samples.path"]).read_text())
    assert table["columns"] == ["step", "prompt", "text"]
    assert {row[0] for row in table["data"]} == {10, 20}
    assert all(row[2].startswith(row[1]) for row in table["data"])
    # The W&B key was in the environment of both processes: it is in no file the run wrote.
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_mfu_on_cpu_is_tokens_times_flops_over_the_cached_probe_peak(resumed, env):
    """Every step's MFU is its tokens/s × FLOPs/token ÷ the CPU peak, and that peak is the probe's
    cached number: measured once, then reused by the resumed process. (Whether the probe measures
    the CPU's real peak depends on the machine and its load: bench/'s question, not a test's.)"""
    rows = [r for r in read_metrics(resumed["run"]) if "event" not in r and r.get("mfu") is not None]
    starts = [r for r in read_metrics(resumed["run"]) if r.get("event") in ("start", "resume")]
    assert len(rows) == 40 and [e["event"] for e in starts] == ["start", "resume"]
    fpt, tokens_per_step = starts[0]["flops_per_token"], starts[0]["tokens_per_step"]
    assert fpt > 0 and all(e["flops_per_token"] == fpt and e["world_size"] == 1 for e in starts)
    for r in rows:
        assert r["tokens_per_sec"] == pytest.approx(tokens_per_step / r["step_time"], rel=1e-6), r
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * fpt / r["peak_flops"], rel=1e-6), r
        assert 0 < r["mfu"] < 1, r
    cached = json.loads((Path(env["SHEEPOP_CACHE_DIR"]) / "peak_flops.json").read_text())
    peaks = {r["peak_flops"] for r in rows}
    assert len(peaks) == 1 and peaks <= set(cached.values()), (peaks, cached)  # one probe, both processes
    # sys/mem_allocated on CPU: the process's resident memory, a plausible size.
    assert all(0.05 < r["mem_allocated"] < 16 for r in rows)


def test_train_without_a_terminal_prints_plain_progress_lines(resumed):
    out = resumed["second"].stdout
    assert "\x1b[" not in out  # no animation escape codes in a log file
    lines = [ln for ln in out.splitlines() if re.match(r"step \d+/40 ", ln)]
    assert lines and lines[-1].startswith("step 40/40"), out[-2000:]
    assert "loss " in lines[-1] and "tok/s" in lines[-1] and "MFU" in lines[-1] and "eta" in lines[-1]


def test_live_view_in_a_terminal_shows_progress_loss_and_mfu(resumed):
    from rich.console import Console

    from sheepop.monitor.live import LiveView

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=110, color_system=None)
    with LiveView(resumed["run"], 40, console, poll_s=0.05, sparkline=True) as view:
        pass  # a finished run: the first frame already shows it all; leaving draws the last one
    assert not view.plain
    text = buf.getvalue()
    snap = view.snap
    assert snap.step == 40 and snap.ended and snap.val_step == 40
    for piece in ("40/40", f"{snap.loss:.4f}", f"{snap.val_loss:.4f}", "tok/s", "MFU", "eta 0s", "run ended"):
        assert piece in text, piece
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")  # the sparkline
