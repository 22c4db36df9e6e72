"""The hang watchdog with real threads and short timeouts: calibration, firing (stacks, slow ranks,
on_hang), per-phase timeouts, close, heartbeat throttling. exit=False keeps this process alive;
two subprocesses check the real aborts (exit code 87, and faulthandler's backstop for a hang that
holds the GIL)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sheepop.train import watchdog
from sheepop.train.watchdog import HANG_EXIT_CODE, HangWatchdog, read_heartbeats, slow_ranks

ROOT = Path(__file__).resolve().parents[2]
POLL = 0.02


def make(tmp_path, rank=0, **kw):
    """A watchdog that reports into a list instead of exiting."""
    hangs: list[dict] = []
    fired = threading.Event()

    def on_hang(info):
        hangs.append(info)
        fired.set()

    kw = {"attempt": 0, "poll_s": POLL, "exit": False, "on_hang": on_hang, **kw}
    wd = HangWatchdog(rank=rank, run_dir=tmp_path, **kw)
    return wd, hangs, fired


def test_calibrates_the_step_timeout_on_the_first_steps_and_does_not_fire(tmp_path):
    wd, hangs, _ = make(tmp_path, floor_s=0.2, factor=10, calibrate_steps=5, init_timeout_s=5.0)
    try:
        wd.beat("init", 0)
        stamps = []
        for step in range(20):
            stamps.append(time.monotonic())
            wd.beat("step", step)
            if step == 3:
                assert wd.step_timeout_s is None  # still calibrating: init_timeout_s watches steps
                assert wd.timeout_for("step") == 5.0
            time.sleep(0.005)
            wd.beat("sync", step)
            time.sleep(0.005)
        measured = statistics.median(b - a for a, b in zip(stamps[:6], stamps[1:6]))
        assert wd.step_timeout_s == pytest.approx(max(0.2, 10 * measured), abs=0.03)
        assert 0.2 <= wd.step_timeout_s < 0.5
        assert wd.timeout_for("sync") == wd.timeout_for("eval") == wd.step_timeout_s
        assert hangs == [] and wd.fired is None
    finally:
        wd.close()


def test_a_fixed_timeout_needs_no_calibration(tmp_path):
    wd, _, _ = make(tmp_path, timeout_s=3.0)
    assert wd.step_timeout_s == 3.0
    wd.close()
    with pytest.raises(ValueError, match="calibrate_steps"):
        HangWatchdog(rank=0, run_dir=tmp_path, attempt=0, calibrate_steps=0, exit=False)
    with pytest.raises(ValueError, match="unknown phase"):
        wd.beat("forward", 1)


def stuck_in_collective(wd: HangWatchdog, release: threading.Event) -> None:
    """A rank's loop that stops beating in "step" 7 (a collective that never returns)."""
    for step in range(7):
        wd.beat("step", step)
        wd.beat("sync", step)
    wd.beat("step", 7)
    release.wait(10)


def test_a_rank_that_stops_beating_writes_its_stacks_and_is_named_slow(tmp_path):
    # Rank 0 got through step 7's work and waits in the all-reduce; rank 1 is stuck in step 7.
    waiting, _, _ = make(tmp_path, rank=0, attempt=2, timeout_s=30)
    waiting.beat("sync", 7)
    stale = tmp_path / "heartbeats" / "rank5.json"  # a rank of an earlier attempt: not counted
    stale.write_text(json.dumps({"rank": 5, "step": 1, "phase": "step", "time": 0, "attempt": 1}))
    stuck, hangs, fired = make(tmp_path, rank=1, attempt=2, timeout_s=0.3)
    release = threading.Event()
    worker = threading.Thread(target=stuck_in_collective, args=(stuck, release))
    t0 = time.monotonic()
    worker.start()
    try:
        assert fired.wait(5)
        assert time.monotonic() - t0 < 1.5
        [info] = hangs
        assert info["rank"] == 1 and info["step"] == 7 and info["phase"] == "step" and info["attempt"] == 2
        assert info["timeout_s"] == 0.3 and info["waited_s"] >= 0.3 and info["slow_ranks"] == [1]
        folder = tmp_path / "hangs" / "attempt2-step7"
        assert info["dir"] == str(folder) and stuck.fired == info
        stacks = (folder / "rank1.txt").read_text()
        assert stacks.startswith("rank 1 ") and "'step' of step 7" in stacks
        assert "stuck_in_collective" in stacks and "Thread 0x" in stacks
        summary = json.loads((folder / "summary_rank1.json").read_text())
        assert summary["slow_ranks"] == [1] and summary["step"] == 7 and summary["phase"] == "step"
        assert [(hb["rank"], hb["phase"], hb["step"]) for hb in summary["heartbeats"]] == [(0, "sync", 7), (1, "step", 7)]
        own = json.loads((tmp_path / "heartbeats" / "rank1.json").read_text())
        assert own["hung"] is True and own["step"] == 7  # the final heartbeat, written before the report
        time.sleep(3 * POLL)
        assert len(hangs) == 1  # it fires once
    finally:
        release.set()
        worker.join()
        stuck.close()
        waiting.close()


def test_slow_ranks_are_the_furthest_behind_by_step_then_phase():
    def hb(rank, phase, step):
        return {"rank": rank, "phase": phase, "step": step}

    assert slow_ranks([hb(0, "sync", 7), hb(1, "step", 7), hb(2, "sync", 7)]) == [1]
    assert slow_ranks([hb(0, "step", 8), hb(1, "save", 7)]) == [1]  # an earlier step is behind any phase
    assert slow_ranks([hb(0, "eval", 7), hb(1, "save", 7), hb(2, "sync", 7)]) == [2]
    assert slow_ranks([hb(0, "sync", 7), hb(1, "sync", 7)]) == [0, 1]  # level: everyone
    assert slow_ranks([hb(3, "init", 0)]) == [3]
    assert slow_ranks([]) == []


def test_init_and_save_have_their_own_timeouts_and_each_beat_restarts_the_timer(tmp_path):
    wd, hangs, fired = make(tmp_path, timeout_s=0.2, init_timeout_s=1.0, save_timeout_s=1.0)
    try:
        wd.beat("init", 0)
        time.sleep(0.3)
        wd.beat("save", 8)
        time.sleep(0.5)
        assert hangs == []  # 0.3 s in init, then 0.5 s in save: both within 1.0 s
        t0 = time.monotonic()
        wd.beat("step", 8)
        assert fired.wait(2)
        assert 0.2 <= time.monotonic() - t0 < 1.0
        assert hangs[0]["phase"] == "step" and hangs[0]["timeout_s"] == 0.2
    finally:
        wd.close()


def test_steps_are_watched_by_init_timeout_while_calibrating(tmp_path):
    wd, hangs, fired = make(tmp_path, timeout_s=0, init_timeout_s=0.3)
    try:
        wd.beat("step", 0)
        assert fired.wait(2)
        assert hangs[0]["timeout_s"] == 0.3 and wd.step_timeout_s is None
    finally:
        wd.close()


def test_close_stops_the_thread_and_nothing_fires_after(tmp_path):
    wd, hangs, _ = make(tmp_path, timeout_s=0.1)
    wd.beat("step", 1)
    wd.close()
    assert not wd._thread.is_alive()
    wd.beat("step", 2)  # harmless after close
    time.sleep(0.4)
    assert hangs == [] and not (tmp_path / "hangs").exists()
    wd.close()  # twice is fine


def test_heartbeat_file_is_throttled_but_catches_up(tmp_path, monkeypatch):
    monkeypatch.setattr(watchdog, "HEARTBEAT_INTERVAL_S", 0.2)
    wd, hangs, _ = make(tmp_path, timeout_s=30)
    try:
        began = time.monotonic()
        for step in range(500):  # 1000 beats
            wd.beat("step", step)
            wd.beat("sync", step)
        took = time.monotonic() - began
        # the first beat at once, then at most one per interval (the bound follows how long the beats
        # took: on a busy CI machine 1000 beats took over 0.4 s and a fixed "<= 3" failed)
        assert 1 <= wd.writes <= 2 + took / watchdog.HEARTBEAT_INTERVAL_S < 1000 / 4, (wd.writes, took)
        [hb] = read_heartbeats(tmp_path)
        assert set(hb) == {"rank", "step", "phase", "time", "pid", "host", "attempt"}
        deadline = time.monotonic() + 2
        while (hb := read_heartbeats(tmp_path)[0])["step"] != 499 and time.monotonic() < deadline:
            time.sleep(POLL)
        assert (hb["step"], hb["phase"]) == (499, "sync")  # the thread wrote the latest beat
        writes = wd.writes
        wd.beat("save", 500)  # entering (and leaving) save is written at once
        assert wd.writes == writes + 1 and read_heartbeats(tmp_path)[0]["phase"] == "save"
        wd.beat("step", 500)
        assert wd.writes == writes + 2
        assert not list((tmp_path / "heartbeats").glob(".*"))  # no temporary file left behind
    finally:
        wd.close()
    assert hangs == []


def test_on_hang_errors_are_swallowed(tmp_path, capfd):
    def broken(info):
        raise RuntimeError("metrics sink is gone")

    wd = HangWatchdog(rank=0, run_dir=tmp_path, attempt=0, timeout_s=0.1, poll_s=POLL, exit=False, on_hang=broken)
    try:
        wd.beat("sync", 3)
        deadline = time.monotonic() + 2
        while wd.fired is None and time.monotonic() < deadline:
            time.sleep(POLL)
        wd._thread.join(2)
        assert wd.fired is not None and not wd._thread.is_alive()
        assert "metrics sink is gone" in capfd.readouterr().err
    finally:
        wd.close()


def run_rank(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = ("import time, ctypes\nfrom pathlib import Path\nfrom sheepop.train import watchdog\n"
              "from sheepop.train.watchdog import HangWatchdog\n" + body)
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_hung_rank_exits_with_the_hang_exit_code(tmp_path):
    r = run_rank(tmp_path, """
import sys
wd = HangWatchdog(rank=3, run_dir=Path(sys.argv[1]), attempt=1, timeout_s=0.3, poll_s=0.05)
def stuck_in_collective():
    wd.beat("sync", 4)
    time.sleep(30)
stuck_in_collective()
""")
    assert r.returncode == HANG_EXIT_CODE, r.stderr
    assert "rank 3 hung" in r.stderr
    assert "stuck_in_collective" in (tmp_path / "hangs" / "attempt1-step4" / "rank3.txt").read_text()
    assert json.loads((tmp_path / "hangs" / "attempt1-step4" / "summary_rank3.json").read_text())["slow_ranks"] == [3]


def test_a_hang_that_holds_the_gil_is_ended_by_the_faulthandler_backstop(tmp_path):
    # libc's sleep called through PyDLL keeps the GIL: the watchdog thread cannot run at all.
    r = run_rank(tmp_path, """
import sys
watchdog.BACKSTOP_GRACE_S = 0.5
wd = HangWatchdog(rank=0, run_dir=Path(sys.argv[1]), attempt=0, timeout_s=0.2, poll_s=0.05)
def holds_the_gil():
    wd.beat("step", 2)
    ctypes.PyDLL(None).sleep(20)
holds_the_gil()
""")
    assert r.returncode == 1, r.stderr  # faulthandler's exit code
    assert "Timeout" in r.stderr and "holds_the_gil" in r.stderr
    assert not (tmp_path / "hangs").exists()  # the Python watchdog never got the GIL
