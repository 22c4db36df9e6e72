"""Live terminal view of a run, fed by its metrics.jsonl (so it works the same for an
in-process run, N Ray workers, or a run someone else started: `sheepop watch`)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sheepop.train.metrics import read_metrics


class LiveView:
    def __init__(self, run_dir: str | Path, total_steps: int, console: Console | None = None, poll_s: float = 0.5):
        self.run_dir, self.total, self.poll_s = Path(run_dir), total_steps, poll_s
        self.console = console or Console()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("val [magenta]{task.fields[val]}"),
            TextColumn("[green]{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, loss="-", val="-", tps="-")

    def update(self) -> None:
        rows = [r for r in read_metrics(self.run_dir) if "event" not in r]
        if not rows:
            return
        last = rows[-1]
        val = next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None)
        tps = last.get("tokens_per_sec")
        self.progress.update(self.task, completed=last["step"],
                             loss=f"{last['loss']:.3f}" if last.get("loss") is not None else "-",
                             val=f"{val:.3f}" if val is not None else "-",
                             tps=f"{tps:,.0f}" if tps else "-")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.update()

    def __enter__(self):
        self.progress.start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.update()
        self.progress.stop()


def wait_for_file(path: Path, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists():
            return True
        time.sleep(0.2)
    return False
