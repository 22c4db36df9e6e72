"""Hang watchdog: a rank whose training loop stops making progress writes its stacks and aborts.

A hung collective (one rank stuck, the others waiting on it in NCCL) never raises: without a
watchdog the run just sits there. Every rank's loop heartbeats, and a daemon thread checks that
the current phase has not gone on longer than its timeout. When it has, the rank
  1. writes its Python stacks to run_dir/hangs/attempt<A>-step<S>/rank<R>.txt (all ranks of a hung
     step use the same folder: they are all at the same step number),
  2. reads every rank's heartbeat file and names the slow ranks (the ones furthest behind) in
     summary_rank<R>.json there,
  3. calls on_hang(info) (the loop writes a `hang` event to metrics.jsonl),
  4. exits with HANG_EXIT_CODE, so Ray Train restarts the worker group from the last checkpoint.

How the loop beats. Every phase of one loop iteration uses the same step number (the step being
computed), so that (step, phase) orders the ranks' progress:

    wd = HangWatchdog(rank=rank, run_dir=run_dir, attempt=attempt, on_hang=...)
    wd.beat("init", start_step)        # engine build, checkpoint load, the first evaluation
    while ...:                         # S = state["step"] at the top of the iteration
        wd.beat("step", S)             # data, forward
        wd.beat("backward", S)         # backward/optimizer (ZeRO's collectives inside), per micro-batch
        wd.beat("sync", S)             # the loss/stop all-reduce, logging
        wd.beat("eval", S)             # when it evaluates
        wd.beat("save", S)             # when it saves
    wd.close()                         # before anything long and unwatched (the final upload wait)

A phase's timer starts at its beat; beating the same phase again restarts it. Nothing is watched
before the first beat. Phase timeouts: "init" init_timeout_s, "save" save_timeout_s, the others
the step timeout (fixed, or calibrated on the first steps; see HangWatchdog).
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

HANG_EXIT_CODE = 87  # a rank that aborts on a hang exits with this (a GIL-held hang: 1, see BACKSTOP_GRACE_S)

# The phases in the order a rank goes through them within one step number: a rank still
# computing "step" S is behind one waiting in "backward" S's gradient all-reduce or in "sync" S.
PHASES = ("init", "step", "backward", "sync", "eval", "save")
_ORDER = {p: i for i, p in enumerate(PHASES)}
# Changes to or from these phases reach the heartbeat file at once (they are rare, and long: the
# other ranks should see a rank enter them). The rest is written at most every HEARTBEAT_INTERVAL_S.
_WRITE_AT_ONCE = frozenset({"init", "eval", "save"})
HEARTBEAT_INTERVAL_S = 1.0
# The longest the hang report (stacks, summary, on_hang) may take before the rank aborts without
# it: the storage under run_dir may be what hangs.
REPORT_DEADLINE_S = 30.0
# Backstop for hangs that hold the GIL (a C call that never releases it): the watchdog thread
# cannot run then, so faulthandler's C thread dumps the stacks to stderr and exits (code 1, which
# faulthandler fixes) 2 × timeout + BACKSTOP_GRACE_S after the last beat. That is well after the
# Python watchdog fires and reports (timeout + poll_s + at most REPORT_DEADLINE_S), so it only
# acts when that could not.
BACKSTOP_GRACE_S = 60.0
# A rank that fires first tells the others (a marker file in run_dir/hangs/) and waits up to this
# long for their stacks before it exits: once one rank has exited, Ray Train tears the group down
# and the other ranks' own watchdogs (as late as poll_s behind) would never write theirs.
PEERS_GRACE_S = 5.0


class _Beat(NamedTuple):
    phase: str
    step: int
    mono: float  # time.monotonic(): what timeouts are measured with (clock changes do not move it)
    wall: float  # time.time(): what the heartbeat file shows (comparable across hosts)


class HangWatchdog:
    """One rank's watchdog. beat() from the training loop; close() when training is over.

    Only one watchdog with exit=True per process: its backstop uses faulthandler's single
    process-wide timer (dump_traceback_later), and close() cancels that timer.
    """

    def __init__(self, *, rank: int, run_dir: Path, attempt: int,
                 # The step/sync/eval timeout. 0: calibrate it on the first steps (below).
                 timeout_s: float = 0.0,
                 # Calibrated step timeout = max(floor_s, factor × median step time of the first
                 # calibrate_steps steps). The median ignores the slow first step (kernel
                 # compilation, allocator warm-up); the floor keeps tiny steps from getting a
                 # timeout that a GC pause, a slow logging call or a busy node exceeds.
                 floor_s: float = 60.0, factor: float = 10.0, calibrate_steps: int = 5,
                 # init (engine build, checkpoint load, first eval) and save are slow and rare:
                 # their own timeouts. init_timeout_s also watches steps until calibration is done.
                 init_timeout_s: float = 900.0, save_timeout_s: float = 900.0,
                 # Called once, from the watchdog's thread, with the hang's info (JSON-ready);
                 # exceptions are logged and swallowed: the rank aborts regardless.
                 on_hang: Callable[[dict], None] | None = None,
                 # How often the watchdog thread wakes: the detection delay past a timeout.
                 poll_s: float = 1.0,
                 # Abort the process on a hang (and arm the GIL backstop). False: report only (tests).
                 exit: bool = True):
        if timeout_s <= 0 and calibrate_steps < 1:
            raise ValueError("HangWatchdog: calibrate_steps must be >= 1 when timeout_s is 0 (calibrated)")
        self.rank, self.run_dir, self.attempt = rank, Path(run_dir), attempt
        self.timeout_s, self.floor_s, self.factor, self.calibrate_steps = timeout_s, floor_s, factor, calibrate_steps
        self.init_timeout_s, self.save_timeout_s = init_timeout_s, save_timeout_s
        self.on_hang, self.poll_s, self.exit = on_hang, poll_s, exit
        self.writes = 0  # heartbeat files written (observable throttling)
        self.fired: dict | None = None  # the hang's info once the watchdog fired
        self._pid, self._host = os.getpid(), socket.gethostname()
        self._hb_dir = self.run_dir / "heartbeats"
        self._hb_dir.mkdir(parents=True, exist_ok=True)
        self._hb_file = self._hb_dir / f"rank{rank}.json"
        self._last: _Beat | None = None  # the latest beat; replaced whole, so the thread reads it without a lock
        self._on_disk: _Beat | None = None  # the beat the heartbeat file shows
        self._written_at = -float("inf")  # monotonic time of the last heartbeat write (or failed try)
        self._write_warned = False
        self._io_lock = threading.Lock()  # the loop and the thread both write the heartbeat file
        # Calibration: intervals between consecutive "step" beats with only "sync" beats between
        # them (an eval or save in between is not a step's work).
        self._step_beat: float | None = None
        self._clean = False
        self._durations: list[float] = []
        self._calibrated: float | None = None
        # Backstop: the beat and timeout faulthandler's timer is armed for.
        self._backstop = exit
        self._arm_lock = threading.Lock()
        self._armed_beat: _Beat | None = None
        self._armed_timeout = 0.0
        self._closed = False
        self._started = time.time()  # a marker older than this is another group's (same attempt number)
        self._marker = self.run_dir / "hangs" / f".firing-attempt{attempt}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"sheepop-hang-watchdog-rank{rank}", daemon=True)
        self._thread.start()

    @property
    def step_timeout_s(self) -> float | None:
        """The step/sync/eval timeout; None while still calibrating (init_timeout_s applies then)."""
        return self.timeout_s if self.timeout_s > 0 else self._calibrated

    def timeout_for(self, phase: str) -> float:
        if phase == "init":
            return self.init_timeout_s
        if phase == "save":
            return self.save_timeout_s
        t = self.step_timeout_s
        return self.init_timeout_s if t is None else t

    def beat(self, phase: str, step: int) -> None:
        """The loop entered `phase` at `step`. Cheap (no I/O) except on the first beat and on
        changes to/from init/eval/save, which are written to the heartbeat file at once."""
        if phase not in _ORDER:
            raise ValueError(f"HangWatchdog.beat: unknown phase {phase!r}; one of {PHASES}")
        if self._closed:
            return
        now = time.monotonic()
        if phase == "step":
            if self._step_beat is not None and self._clean and len(self._durations) < self.calibrate_steps:
                self._durations.append(now - self._step_beat)
                if len(self._durations) == self.calibrate_steps:
                    self._calibrated = max(self.floor_s, self.factor * statistics.median(self._durations))
            self._step_beat, self._clean = now, True
        elif phase not in ("backward", "sync"):  # a step's own phases
            self._clean = False
        prev = self._last
        self._last = beat = _Beat(phase, step, now, time.time())
        if prev is None or (phase != prev.phase and (phase in _WRITE_AT_ONCE or prev.phase in _WRITE_AT_ONCE)):
            self._write(beat)
        # A longer timeout (entering save or init) must be armed before the phase's work starts:
        # that work might hold the GIL, and then the thread could not re-arm. A shorter one can
        # wait for the thread.
        if self._backstop and self.timeout_for(phase) > self._armed_timeout:
            self._arm()

    def close(self) -> None:
        """Stop watching: the thread ends, the backstop is cancelled, no hang fires after this."""
        self._closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)  # it may be mid-write on slow storage: don't wait for ever
        with self._arm_lock:
            if self._armed_beat is not None:
                faulthandler.cancel_dump_traceback_later()
                self._armed_beat = None

    def __enter__(self) -> HangWatchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the watchdog thread ---------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            beat = self._last
            if beat is None:
                continue
            timeout = self.timeout_for(beat.phase)
            waited = time.monotonic() - beat.mono
            if waited > timeout or self._peer_fired():
                self._fire(beat, waited, timeout)
                return
            if beat is not self._on_disk and time.monotonic() - self._written_at >= HEARTBEAT_INTERVAL_S:
                self._write(beat)
            if self._backstop and (beat is not self._armed_beat or timeout != self._armed_timeout):
                self._arm()

    def _peer_fired(self) -> bool:
        """Another rank of this group (on this machine) has fired: write our stacks too, now."""
        try:
            return self._marker.stat().st_mtime >= self._started
        except OSError:
            return False

    def _fire(self, beat: _Beat, waited: float, timeout: float) -> None:
        if self._stop.is_set():  # closed meanwhile
            return
        if self.exit:  # tell the other ranks (Ray Train restarts the group when the first one exits)
            try:
                self._marker.parent.mkdir(parents=True, exist_ok=True)
                self._marker.write_text(f"rank {self.rank}\n")
            except OSError:
                pass
        # The report runs in its own thread with a deadline: writing to a stuck file system must
        # not keep the rank from aborting.
        report = threading.Thread(target=self._report, args=(beat, waited, timeout), daemon=True,
                                  name=f"sheepop-hang-report-rank{self.rank}")
        report.start()
        report.join(REPORT_DEADLINE_S)
        if report.is_alive():
            _log(f"rank {self.rank}: the hang report took over {REPORT_DEADLINE_S:.0f} s (stuck storage?); "
                 "aborting without it")
        if self.exit:
            self._wait_for_peers(self.run_dir / "hangs" / f"attempt{self.attempt}-step{beat.step}")
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(HANG_EXIT_CODE)

    def _wait_for_peers(self, folder: Path) -> None:
        """Until every rank of this attempt that heartbeats here has written its stacks (at most PEERS_GRACE_S)."""
        deadline = time.monotonic() + PEERS_GRACE_S
        while time.monotonic() < deadline:
            ranks = {hb["rank"] for hb in read_heartbeats(self.run_dir) if hb.get("attempt") == self.attempt}
            if all((folder / f"rank{r}.txt").exists() for r in ranks):
                return
            time.sleep(0.2)

    def _report(self, beat: _Beat, waited: float, timeout: float) -> None:
        folder = self.run_dir / "hangs" / f"attempt{self.attempt}-step{beat.step}"
        info = {"rank": self.rank, "attempt": self.attempt, "phase": beat.phase, "step": beat.step,
                "waited_s": round(waited, 3), "timeout_s": round(timeout, 3), "slow_ranks": None,
                "dir": str(folder), "host": self._host, "pid": self._pid}
        _log(f"rank {self.rank} hung: phase {beat.phase!r} of step {beat.step} has run {waited:.1f} s "
             f"(timeout {timeout:.1f} s); stacks in {folder}" + (f"; exiting with {HANG_EXIT_CODE}" if self.exit else ""))
        _attempt("final heartbeat", self._write, beat, hung=True)
        _attempt("stacks", self._dump_stacks, folder, beat, waited, timeout)
        info["slow_ranks"] = _attempt("summary", self._summarize, folder, beat, waited, timeout)
        self.fired = info
        if self.on_hang is not None:
            _attempt("on_hang", self.on_hang, dict(info))

    def _dump_stacks(self, folder: Path, beat: _Beat, waited: float, timeout: float) -> None:
        # faulthandler names threads by id only: list their names first.
        names = ", ".join(f"0x{t.ident:016x} {t.name}" for t in threading.enumerate() if t.ident is not None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank{self.rank}.txt", "w") as f:
                f.write(f"rank {self.rank} (pid {self._pid} on {self._host}, attempt {self.attempt}): phase "
                        f"{beat.phase!r} of step {beat.step}, {waited:.1f} s since its beat, timeout {timeout:.1f} s\n"
                        f"threads: {names} (sheepop-hang-*: the watchdog's own)\n\n")
                f.flush()  # faulthandler writes to the descriptor, past Python's buffer
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError:
            faulthandler.dump_traceback(sys.stderr, all_threads=True)  # the stacks somewhere at least
            raise

    def _summarize(self, folder: Path, beat: _Beat, waited: float, timeout: float) -> list[int]:
        # Other ranks' heartbeats of this attempt (files of an earlier attempt are stale), and ours
        # from memory (the freshest).
        heartbeats = [hb for hb in read_heartbeats(self.run_dir)
                      if hb.get("attempt") == self.attempt and hb["rank"] != self.rank]
        heartbeats.append(self._record(beat, hung=True))
        now = time.time()
        for hb in heartbeats:
            hb["age_s"] = round(now - hb["time"], 3)  # across hosts, as good as their clocks agree
        heartbeats.sort(key=lambda hb: hb["rank"])
        slow = slow_ranks(heartbeats)
        summary = {"rank": self.rank, "slow_ranks": slow, "phase": beat.phase, "step": beat.step,
                   "waited_s": round(waited, 3), "timeout_s": round(timeout, 3), "heartbeats": heartbeats}
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"summary_rank{self.rank}.json", summary)
        return slow

    # -- heartbeat file and backstop (either thread) ------------------------------------------

    def _record(self, beat: _Beat, **extra) -> dict:
        return {"rank": self.rank, "step": beat.step, "phase": beat.phase, "time": beat.wall,
                "pid": self._pid, "host": self._host, "attempt": self.attempt, **extra}

    def _write(self, beat: _Beat, **extra) -> None:
        with self._io_lock:
            self._written_at = time.monotonic()  # a failed write is retried no sooner than a throttled one
            try:
                _write_json(self._hb_file, self._record(beat, **extra))
            except OSError as e:  # a heartbeat must never stop training
                if not self._write_warned:
                    self._write_warned = True
                    _log(f"rank {self.rank}: cannot write the heartbeat file {self._hb_file}: {e}")
                return
            self.writes += 1
            self._on_disk = beat

    def _arm(self) -> None:
        with self._arm_lock:  # whoever arms last arms the latest beat
            beat = self._last
            if self._closed or not self._backstop or beat is None:
                return
            timeout = self.timeout_for(beat.phase)
            delay = beat.mono + 2 * timeout + BACKSTOP_GRACE_S - time.monotonic()
            try:
                # fd 2: the process's stderr (Ray's worker log) even when sys.stderr is replaced.
                faulthandler.dump_traceback_later(max(delay, 1.0), exit=True, file=2)
            except (OSError, ValueError, RuntimeError) as e:
                self._backstop = False
                _log(f"rank {self.rank}: no GIL-hang backstop (faulthandler: {e})")
                return
            self._armed_beat, self._armed_timeout = beat, timeout


def slow_ranks(heartbeats: list[dict]) -> list[int]:
    """The ranks furthest behind: the smallest (step, phase order). All of them when all are level."""
    position = {hb["rank"]: (hb["step"], _ORDER[hb["phase"]]) for hb in heartbeats if hb.get("phase") in _ORDER}
    if not position:
        return []
    lowest = min(position.values())
    return sorted(r for r, p in position.items() if p == lowest)


def read_heartbeats(run_dir: Path) -> list[dict]:
    """Every well-formed heartbeats/rank*.json under run_dir (unreadable ones are skipped)."""
    out = []
    for path in sorted((Path(run_dir) / "heartbeats").glob("rank*.json")):
        try:
            hb = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(hb, dict) and isinstance(hb.get("rank"), int) and isinstance(hb.get("step"), int)
                and hb.get("phase") in _ORDER and isinstance(hb.get("time"), (int, float))):
            out.append(hb)
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # a dotfile: rank*.json globs never see it half-written
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _attempt(what: str, fn, *args, **kwargs):
    """fn(...), or None after logging why it failed: each part of a hang report is best effort."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        _log(f"hang watchdog: {what} failed:\n{traceback.format_exc()}")
        return None


def _log(msg: str) -> None:
    try:
        print(f"sheepop: {msg}", file=sys.stderr, flush=True)
    except Exception:
        pass
