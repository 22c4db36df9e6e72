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


# A run whose worker group Ray restarted: attempt 0 logged steps 1..10 (checkpoint at 5) and died;
# attempt 1 resumed from step 5 and logged 6..12 again with other values. It reads as steps 1..12,
# attempt 1's values for 6..10.
RESUME_AT, DIED_AT, MAX_STEPS = 5, 10, 12


def _step_row(step: int, attempt: int, t: float) -> dict:
    warm = step == (1, RESUME_AT + 1)[attempt]  # each attempt's first step: compilation, a loaded checkpoint
    row = {"time": t, "attempt": attempt, "step": step, "loss": 10 - step / 2 - attempt / 4,
           "lr": step * 1e-4 * (1 + attempt), "tokens": step * 100,
           "tokens_per_sec": 100.0 if warm else 1000.0 * (1 + attempt), "step_time": 5.0 if warm else (0.6, 0.3)[attempt],
           "mfu": 0.1 * (1 + attempt), "mem_allocated": 1.0 + attempt}
    if step % 5 == 0:
        row["val_loss"] = 9 - step / 2 - attempt / 4
    return row


def _replayed_rows() -> list[dict]:
    rows = [{"time": 100.0, "attempt": 0, "event": "start", "step": 0, "world_size": 2},
            {"time": 100.5, "attempt": 0, "step": 0, "val_loss": 9.5}]
    for step in range(1, DIED_AT + 1):
        rows.append(_step_row(step, 0, 100.0 + step))
        if step == RESUME_AT:
            rows.append({"time": 100.0 + step, "attempt": 0, "event": "checkpoint", "step": step})
    rows.append({"time": 200.0, "attempt": 1, "event": "resume", "step": RESUME_AT, "world_size": 2})
    for step in range(RESUME_AT + 1, MAX_STEPS + 1):
        rows.append(_step_row(step, 1, 200.0 + 2 * (step - RESUME_AT)))
        if step in (10, MAX_STEPS):
            rows.append({"time": 200.0 + 2 * (step - RESUME_AT), "attempt": 1, "event": "checkpoint", "step": step})
    rows.append({"time": 230.0, "attempt": 1, "event": "end", "step": MAX_STEPS, "stopped": False})
    return rows


def _expected(key: str) -> tuple[list[int], list[float]]:
    """`key` of steps 1..12 as the run ends up: attempt 0 up to the checkpoint, attempt 1 after it."""
    steps = list(range(1, MAX_STEPS + 1))
    return steps, [_step_row(s, int(s > RESUME_AT), 0)[key] for s in steps]


@pytest.fixture
def replayed(tmp_path):
    """The rows of the restarted run, written to a metrics.jsonl and read back."""
    from sheepop.monitor.metrics_file import read_metrics

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _replayed_rows()))
    rows = read_metrics(tmp_path)
    assert len(rows) == len(_replayed_rows())
    return rows


def test_live_view_counts_each_replayed_step_once_with_its_last_record(replayed):
    from sheepop.monitor.live import Progress, Snapshot, plain_line

    snap = Snapshot.from_rows(replayed, MAX_STEPS)
    assert (snap.step, snap.attempt, snap.ended) == (MAX_STEPS, 1, True)
    assert snap.losses == _expected("loss")[1]  # 12 steps, not 17
    assert snap.loss == _step_row(MAX_STEPS, 1, 0)["loss"]
    assert (snap.val_step, snap.val_loss) == (10, _step_row(10, 1, 0)["val_loss"])  # attempt 1's eval of step 10
    assert snap.tokens_per_sec == 2000.0 and snap.mfu == pytest.approx(0.2)
    assert snap.eta_s == 0 and snap.elapsed_s == 30.0  # from the resume (t=200) to the end (t=230)
    assert plain_line(snap).endswith("attempt 1")
    progress = Progress()  # a line at a time, as the live view polls: the same
    for r in replayed:
        progress.add([r])
    assert progress.snapshot(MAX_STEPS) == snap

    # While attempt 1 re-runs them, attempt 0's steps past the resume point do not count yet.
    resume = next(i for i, r in enumerate(replayed) if r.get("event") == "resume")
    snap = Snapshot.from_rows(replayed[:resume + 1], MAX_STEPS)
    assert (snap.step, snap.attempt, len(snap.losses)) == (RESUME_AT, 1, RESUME_AT)
    assert snap.loss == _step_row(RESUME_AT, 0, 0)["loss"] and snap.val_step == RESUME_AT
    assert snap.elapsed_s == 0.0  # not negative: attempt 0's last line is older than the resume
    at7 = next(i for i, r in enumerate(replayed) if r.get("attempt") == 1 and r.get("step") == 7)
    snap = Snapshot.from_rows(replayed[:at7 + 1], MAX_STEPS)
    assert snap.step == 7 and snap.losses == _expected("loss")[1][:7]
    assert (snap.val_step, snap.val_loss) == (5, _step_row(5, 0, 0)["val_loss"])  # not attempt 0's step 10
    assert snap.eta_s == pytest.approx((MAX_STEPS - 7) * 2.0)  # attempt 1's pace: 2 s a step
    assert snap.elapsed_s == 4.0

    # A replay that no start/resume line announces still resets the pace (steps went back).
    plain = [r for r in _replayed_rows() if "event" not in r]
    snap = Snapshot.from_rows(plain, MAX_STEPS)
    assert snap.step == MAX_STEPS and snap.losses == _expected("loss")[1]
    assert snap.eta_s == 0


def test_plot_series_take_the_last_record_of_each_step(replayed):
    from sheepop.monitor import plot

    def series(fig, panel: int = 0, line: int = 0) -> tuple[list, list]:
        ln = fig.axes[panel].lines[line]
        return list(ln.get_xdata()), list(ln.get_ydata())

    fig = plot.loss_figure(replayed)
    assert series(fig) == _expected("loss")
    assert series(fig, line=1) == ([0, 5, 10], [9.5, _step_row(5, 0, 0)["val_loss"], _step_row(10, 1, 0)["val_loss"]])
    assert list(fig.axes[0].lines[2].get_xdata()) == [RESUME_AT, RESUME_AT]  # the resume is marked
    assert series(plot.lr_figure(replayed)) == _expected("lr")
    fig = plot.throughput_figure(replayed)
    assert series(fig, 0) == _expected("tokens_per_sec")
    steps, mfu = series(fig, 1)
    assert steps == _expected("mfu")[0] and mfu == pytest.approx([100 * v for v in _expected("mfu")[1]])
    assert series(fig, 2) == _expected("mem_allocated")
    plot._plt().close("all")


def test_report_numbers_count_replayed_steps_once(replayed, tmp_path):
    from sheepop.monitor import report
    from sheepop.monitor.metrics_file import latest_per_step

    assert latest_per_step(replayed, "tokens_per_sec", skip_warmup=True) == (
        [2, 3, 4, 5, 7, 8, 9, 10, 11, 12], [1000.0] * 4 + [2000.0] * 6)  # each attempt's first step left out
    cfg = {"trainer": {"max_steps": MAX_STEPS}, "run": {"dir": str(tmp_path), "name": "r"},
           "cluster": {"storage_path": None}}
    rep = report.Report("r")
    report.summary_section(rep, cfg, replayed)
    report.events_section(rep, cfg, replayed)
    summary, events = (s.md.splitlines()[2:] for s in rep.sections)
    got = dict(line.strip("| ").split(" | ", 1) for line in summary)
    assert got["steps"] == f"{MAX_STEPS} / {MAX_STEPS}" and got["tokens seen"] == "1,200"
    assert got["status"] == "finished"
    assert got["final train loss"] == report.num(_step_row(MAX_STEPS, 1, 0)["loss"])
    assert got["final validation loss"].endswith("at step 10")
    # Counting every line would give 1,000 tokens/s, 0.6s and 10% (attempt 0 logged more lines).
    assert got["median tokens/s"] == "2,000" and got["median step time"] == "0.3s"
    assert got["median MFU"] == "20.00%" and got["peak memory (max over ranks)"] == "2.00 GiB"
    assert got["restarts"] == "1 (5 step(s) run again, counted once)"
    table = [[c.strip() for c in line.strip("|").split("|")] for line in events[:5]]
    assert [(r[0], r[1], r[2]) for r in table] == [("start", "0", "0"), ("checkpoint", "5", "0"), ("resume", "5", "1"),
                                                   ("checkpoint", "10", "1"), ("checkpoint", "12", "1")]


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


def test_a_cpu_peak_probed_on_a_busy_machine_is_raised_to_what_a_step_achieves(tmp_path, monkeypatch):
    """The matmul probe is cached per machine; one taken while other processes held the cores is
    too low, and MFU came out at 194% in the demo. A step that beats the cached peak replaces it."""
    import json

    from sheepop import perf
    from sheepop.train.metrics import step_extras

    monkeypatch.setenv("SHEEPOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(perf, "_memo", {})
    key, _ = perf._cpu_key(False)
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: 1e6}))  # a probe on a very busy machine
    first = step_extras(flops_per_token=1e3, tokens_per_sec=3000.0, world_size=1, device="cpu")  # 3 MFLOP/s
    peak = first["peak_flops"]
    assert peak > 1e8 and first["mfu"] == pytest.approx(3e6 / peak)  # probed again: any CPU beats 0.1 GFLOP/s
    assert json.loads((tmp_path / "peak_flops.json").read_text())[key] == peak
    again = step_extras(flops_per_token=1e3, tokens_per_sec=1500.0, world_size=1, device="cpu")
    assert again["peak_flops"] == peak  # from the cache: no probe on every step


def test_the_drivers_view_of_a_resumed_run_shows_nothing_of_the_earlier_attempt_until_this_one_starts(tmp_path):
    """`sheepop train` resuming a finished run: the file ends with the earlier attempt's last step
    and `end`; its view waits for this launch's resume event instead of showing those as now."""
    import io

    from rich.console import Console

    from sheepop.monitor.live import LiveView

    rows = _replayed_rows()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = io.StringIO()
    view = LiveView(tmp_path, 20, Console(file=out, width=200), poll_s=60, plain=True, plain_every_s=0, launch=True)
    with view:
        assert view.waiting() and "starting" in str(view.render().renderables[0])
        with metrics.open("a") as f:
            f.write(json.dumps({"time": 300.0, "attempt": 2, "event": "resume", "step": MAX_STEPS}) + "\n")
            f.write(json.dumps({**_step_row(MAX_STEPS, 1, 302.0), "step": MAX_STEPS + 1, "attempt": 2}) + "\n")
        snap = view.update()
        assert not view.waiting() and (snap.step, snap.attempt, snap.ended) == (MAX_STEPS + 1, 2, False)
    printed = [line for line in out.getvalue().splitlines() if line.strip()]
    assert printed and all(line.startswith(f"step {MAX_STEPS + 1}/20") for line in printed), printed
