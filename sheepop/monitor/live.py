"""Live terminal view of a run, fed by its metrics.jsonl (so it works the same for an
in-process run, N Ray workers, or a run someone else started: `sheepop watch`).

On a terminal: an animated panel (step/total bar, loss, val loss, tokens/s, MFU, ETA; `watch`
adds a loss sparkline). Elsewhere (Ray Job logs, CI, a pipe) an animation would be noise, so
it prints one plain line every `plain_every_s` seconds when the run has moved, and a last one
at the end.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sheepop.monitor.metrics_file import MetricsTail
from sheepop.units import duration

SPARK = "▁▂▃▄▅▆▇█"
ETA_WINDOW = 50  # metric rows the time-per-step estimate looks back over


@dataclass
class Snapshot:
    """What the view shows, computed from metrics.jsonl rows."""

    total: int
    step: int = 0
    loss: float | None = None
    val_loss: float | None = None
    val_step: int | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    ended: bool = False
    last_time: float | None = None
    attempt: int = 0  # 0 = the first start; +1 per resume or restart
    losses: list[float] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: list[dict], total: int) -> "Snapshot":
        progress = Progress()
        progress.add(rows)
        return progress.snapshot(total)


class Progress:
    """What a Snapshot needs, accumulated row by row: a poll costs only the rows it adds.

    After a worker restart the steps since the last checkpoint run again: each step counts once,
    with its last record, and steps an earlier attempt logged beyond where the run now is are
    left out until they are re-run (they belong to a trajectory the restart threw away)."""

    def __init__(self):
        self.started = False  # a start/resume event was seen: ETA and elapsed count from the latest
        self.starts = 0  # start/resume events seen
        self.start_time: float | None = None
        self.ended = False
        self.last_time: float | None = None  # of the newest line of any kind
        self.attempt = 0
        self.step: int | None = None  # where the run is: its newest step row, or where its latest start/resume began
        self.last: dict | None = None  # the newest step row
        self.by_step: dict[int, float] = {}  # loss; a re-run step replaces the earlier record
        self.val_by_step: dict[int, float] = {}
        self.recent: deque[tuple[float, int]] = deque(maxlen=ETA_WINDOW)  # (time, step) of this attempt

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            if r.get("time") is not None:
                self.last_time = r["time"]
            self.attempt = r.get("attempt", self.attempt)
            ev = r.get("event")
            if ev in ("start", "resume"):
                self.started, self.start_time, self.ended = True, r.get("time"), False
                self.starts += 1
                self.recent.clear()
                self.step = r.get("step", self.step)
            elif ev == "end" and self.started:
                self.ended = True
            elif ev is None and r.get("step") is not None:
                self.last, self.step = r, r["step"]
                if r.get("loss") is not None:
                    self.by_step[r["step"]] = r["loss"]
                    if r.get("time"):
                        if self.recent and r["step"] <= self.recent[-1][1]:
                            self.recent.clear()  # steps went back without a start/resume line
                        self.recent.append((r["time"], r["step"]))
                if r.get("val_loss") is not None:
                    self.val_by_step[r["step"]] = r["val_loss"]

    def snapshot(self, total: int) -> Snapshot:
        snap = Snapshot(total=total, ended=self.ended, last_time=self.last_time, attempt=self.attempt)
        if self.step is None:
            return snap
        snap.step = self.step
        steps = sorted(self.by_step)
        snap.losses = [self.by_step[s] for s in steps[:bisect_right(steps, snap.step)]]
        snap.loss = snap.losses[-1] if snap.losses else None
        last = self.last or {}
        snap.tokens_per_sec, snap.mfu = last.get("tokens_per_sec"), last.get("mfu")
        val_steps = [s for s in self.val_by_step if s <= snap.step]
        if val_steps:
            snap.val_step = max(val_steps)
            snap.val_loss = self.val_by_step[snap.val_step]
        # Wall time per step over the recent rows of this attempt: includes evals and saves,
        # which the per-step step_time does not.
        (t0, s0), (t1, s1) = (self.recent[0], self.recent[-1]) if self.recent else ((None, 0), (None, 0))
        per_step = (t1 - t0) / (s1 - s0) if len(self.recent) >= 2 and s1 > s0 else last.get("step_time")
        if per_step is not None:
            snap.eta_s = max(0, total - snap.step) * per_step
        if self.start_time and self.last_time:
            snap.elapsed_s = max(0.0, self.last_time - self.start_time)
        return snap


def sparkline(values: list[float], width: int = 40) -> str:
    """Unicode block sparkline: values averaged into `width` buckets, scaled min → max."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((m - lo) / span * len(SPARK)))] for m in means)


def plain_line(snap: Snapshot) -> str:
    parts = [f"step {snap.step}/{snap.total}"]
    if snap.loss is not None:
        parts.append(f"loss {snap.loss:.4f}")
    if snap.val_loss is not None:
        parts.append(f"val {snap.val_loss:.4f}")
    if snap.tokens_per_sec:
        parts.append(f"{snap.tokens_per_sec:,.0f} tok/s")
    if snap.mfu is not None:
        parts.append(f"MFU {snap.mfu:.1%}")
    parts.append(f"eta {duration(snap.eta_s)}")
    if snap.attempt:
        parts.append(f"attempt {snap.attempt}")
    return "  ".join(parts)


class LiveView:
    """Poll metrics.jsonl in a thread and show it. Use as a context manager, or `run_until_end`."""

    def __init__(self, run_dir: str | Path, total_steps, console: Console | None = None, poll_s: float = 0.5,
                 *, sparkline: bool = False, plain: bool | None = None, plain_every_s: float = 10.0,
                 launch: bool = False):
        # total_steps: an int, or a function re-read at each poll (watch: a resume may raise it)
        # launch: the driver's own view of the run it is starting: it shows nothing of the file
        # until a start/resume event newer than what the file held at entry (not an earlier
        # attempt's last line). Counted, not timed: rank 0 may write on a machine with another clock.
        self.launch, self._starts_before = launch, None
        self.run_dir, self.poll_s = Path(run_dir), poll_s
        self._total = total_steps if callable(total_steps) else (lambda: total_steps)
        self.console = console or Console()
        self.show_sparkline = sparkline
        self.plain = (not self.console.is_terminal or self.console.is_dumb_terminal) if plain is None else plain
        self.plain_every_s = plain_every_s
        self.snap = Snapshot(total=self._total())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        self._printed_step: int | None = None
        self._printed_at = 0.0
        self._tail, self._progress = MetricsTail(run_dir), Progress()

    # -- state -------------------------------------------------------------------------------
    def update(self) -> Snapshot:
        rows = self._tail.read()
        if self._tail.restarted:
            self._progress = Progress()
        self._progress.add(rows)
        self.snap = self._progress.snapshot(self._total())
        if self.waiting():
            if self._live is not None:
                self._live.update(self.render())
            return self.snap
        if self.plain:
            now = time.monotonic()
            if self.snap.step != self._printed_step and self.snap.losses and now - self._printed_at >= self.plain_every_s:
                self._print_plain(now)
        elif self._live is not None:
            self._live.update(self.render())
        return self.snap

    def waiting(self) -> bool:
        """Still before this launch's start/resume event (see `launch`)."""
        return self.launch and self._progress.starts <= (self._starts_before or 0)

    def _print_plain(self, now: float) -> None:
        self.console.print(plain_line(self.snap), highlight=False, soft_wrap=True)
        self._printed_step, self._printed_at = self.snap.step, now

    # -- rendering ---------------------------------------------------------------------------
    def render(self) -> Group:
        s = self.snap
        if self.waiting():
            return Group(Text("starting: workers, data check, engine…", style="dim"))
        head = Table.grid(padding=(0, 1))
        head.add_row(Text("step", style="bold"), Text(f"{s.step}/{s.total}"),
                     ProgressBar(total=max(1, s.total), completed=min(s.step, s.total), width=36),
                     Text(f"{min(1.0, s.step / max(1, s.total)):>4.0%}"),
                     Text(f"eta {duration(s.eta_s)}", style="yellow"),
                     Text(f"elapsed {duration(s.elapsed_s)}", style="dim"))
        stats = Text.assemble(
            ("loss ", "bold"), (f"{s.loss:.4f}" if s.loss is not None else "-", "cyan"), "   ",
            ("val ", "bold"), (f"{s.val_loss:.4f}" if s.val_loss is not None else "-", "magenta"),
            (f" @{s.val_step}" if s.val_step is not None else "", "dim"), "   ",
            (f"{s.tokens_per_sec:,.0f}" if s.tokens_per_sec else "-", "green"), " tok/s   ",
            ("MFU ", "bold"), (f"{s.mfu:.1%}" if s.mfu is not None else "-", "green"),
            (f"   attempt {s.attempt}" if s.attempt else "", "dim"),
        )
        parts = [head, stats]
        if self.show_sparkline and s.losses:
            parts.append(Text.assemble(("loss ", "bold"), (sparkline(s.losses), "cyan"),
                                       (f"  {s.losses[0]:.3f} → {s.losses[-1]:.3f}", "dim")))
        if s.last_time and not s.ended and time.time() - s.last_time > 120:
            parts.append(Text(f"no new metrics for {duration(time.time() - s.last_time)}", style="red"))
        if s.ended:
            parts.append(Text("run ended", style="bold green"))
        return Group(*parts)

    # -- lifecycle ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.update()

    def __enter__(self):
        if self.launch:
            self._progress.add(self._tail.read())
            self._starts_before = self._progress.starts
        self.update()  # the first frame shows the run as it is (watch on a running or finished run)
        if not self.plain:
            self._live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sheepop-live-view")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.update()
        if self._live is not None:
            self._live.update(self.render())
            self._live.stop()
            self._live = None
        elif self.snap.losses and self.snap.step != self._printed_step and not self.waiting():
            self._print_plain(time.monotonic())  # the final state, always

    def run_until_end(self, timeout_s: float | None = None) -> Snapshot:
        """Show the run until its latest attempt logs `end` (or the timeout passes)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self:
            while not self.snap.ended and (deadline is None or time.monotonic() < deadline):
                time.sleep(self.poll_s)
        return self.snap
