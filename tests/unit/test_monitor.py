"""Monitoring without a training run: the incremental metrics.jsonl reader, the sparkline,
`sheepop watch` on a run written by this test, and the GPU peak table. On real runs (W&B, MFU,
the live view): tests/integration/test_monitor.py."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import ROOT, sheepop

# A hang guard per expected line of `sheepop watch` (it answers within a poll, 0.05 s, normally).
LINE_TIMEOUT = 300


def test_metrics_tail_reads_only_new_complete_lines_and_restarts_on_a_new_file(tmp_path):
    from sheepop.monitor.live import Progress, Snapshot
    from sheepop.monitor.metrics_file import MetricsTail

    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(tmp_path)
    assert tail.read() == []  # no file yet
    path.write_text('{"event": "start", "time": 1}\n{"step": 1, "loss": 5.0, "time": 2}\n{"step": 2, "lo')
    first = tail.read()
    assert [r.get("step") for r in first] == [None, 1]  # the half-written line waits
    with open(path, "a") as f:
        f.write('ss": 4.0, "time": 3}\n{"step": 3, "loss": 3.0, "time": 4}\n')
    second = tail.read()
    assert [r["step"] for r in second] == [2, 3] and tail.read() == []
    progress = Progress()
    progress.add(first)
    progress.add(second)
    assert progress.snapshot(10) == Snapshot.from_rows(first + second, 10)  # incremental = all at once
    path.write_text('{"step": 1, "loss": 9.0, "time": 5}\n')  # a new run in the same folder
    assert [r["loss"] for r in tail.read()] == [9.0] and tail.restarted


def test_read_metrics_and_latest_per_step_take_the_last_record_of_a_replayed_step(tmp_path):
    from sheepop.monitor.metrics_file import latest_per_step, read_metrics

    assert read_metrics(tmp_path) == []  # no file yet
    rows = [{"event": "start", "step": 0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
            {"event": "resume", "step": 1}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": 3.0, "val_loss": 3.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert read_metrics(tmp_path) == rows  # the line being written is left out
    assert latest_per_step(rows, "loss") == ([1, 2, 3], [5.0, 3.5, 3.0])
    assert latest_per_step(rows, "val_loss") == ([3], [3.2])


def test_sparkline_follows_the_values():
    from sheepop.monitor.live import sparkline

    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert len(sparkline(list(range(1000)), width=40)) == 40
    assert sparkline([]) == ""


def _lines_of(stream) -> queue.Queue:
    """The lines of a text stream as a thread reads them (None at its end)."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_watch_tails_a_run_until_its_end_event(tmp_path):
    """`sheepop watch` on a run that is being written: one line per new step, in order, as each
    row arrives (the next row is written only once the line of the last one is out), and it
    exits at `end`. Paced by the watcher's output, not by sleeps: any machine speed gives the
    same frames."""
    run = tmp_path / "watched"
    run.mkdir()
    (run / "config.yaml").write_text("trainer:\n  max_steps: 6\n")
    metrics = run / "metrics.jsonl"
    metrics.write_text(json.dumps({"event": "start", "step": 0, "time": time.time()}) + "\n")
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "watch", str(run), "poll=0.05", "every=0",
                          f"timeout={10 * LINE_TIMEOUT}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = _lines_of(p.stdout)
    seen: list[str] = []

    def next_step_line() -> str:
        while True:
            line = out.get(timeout=LINE_TIMEOUT)
            assert line is not None, f"watch ended early: {seen}"
            seen.append(line)
            if line.startswith("step "):
                return line

    try:
        for step in range(1, 7):
            with metrics.open("a") as f:
                f.write(json.dumps({"time": time.time(), "step": step, "loss": 7.0 - step / 2,
                                    "tokens_per_sec": 1000.0, "mfu": 0.05, "step_time": 0.3}) + "\n")
            assert next_step_line().startswith(f"step {step}/6  loss {7.0 - step / 2:.4f}"), seen
            assert p.poll() is None  # still watching: no `end` yet
        with metrics.open("a") as f:
            f.write(json.dumps({"time": time.time(), "event": "end", "step": 6, "stopped": False}) + "\n")
        p.wait(timeout=LINE_TIMEOUT)
        rest = []
        while (line := out.get(timeout=LINE_TIMEOUT)) is not None:
            rest.append(line)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert p.returncode == 0, err
    assert not any(line.startswith("step ") for line in rest), rest  # step 6 was already shown: no repeat
    assert rest[-1] == "run ended at step 6/6", seen + rest


def test_watch_rejects_a_directory_that_is_not_a_run(tmp_path):
    r = sheepop("watch", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "RUN_DIR" in r.stderr, r.stderr
    r = sheepop("watch", str(tmp_path))
    assert r.returncode == 2 and "metrics.jsonl" in r.stderr, r.stderr
    r = sheepop("watch", str(tmp_path), "pol=1")
    assert r.returncode == 2 and "valid for watch: poll" in r.stderr, r.stderr


def test_gpu_peaks_come_from_the_table():
    """No GPU here: the table lookup is checked by name (the names torch reports)."""
    from sheepop import perf

    assert perf.gpu_peak("NVIDIA H100 80GB HBM3", half=True) == 989e12
    assert perf.gpu_peak("NVIDIA H100 PCIe", half=True) == 756e12
    assert perf.gpu_peak("NVIDIA L40S", half=False) == 91.6e12  # not the L4 entry
    assert perf.gpu_peak("NVIDIA A100-SXM4-80GB", half=False) == 19.5e12
    assert perf.gpu_peak("Some Future Accelerator", half=True) is None
    assert perf.mfu(1e6, 1e5, 1e12, devices=2) == pytest.approx(0.05)
