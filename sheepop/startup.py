"""Start-up timeline: when each phase between `sheepop train` and the first training step ended.

The driver marks its phases in its own process (`mark`) and hands them to the ranks in the RunPlan;
rank 0 adds its own and logs them in its `start` event as `startup`: seconds since the `sheepop`
process was launched, in the order they happened. `bench/startup.py` prints them; anyone whose run
is slow to start can read where the time went in metrics.jsonl.
"""
from __future__ import annotations

import os
import time

_MARKS: dict[str, float] = {}


def process_start() -> float:
    """When this process was created (wall clock, seconds since the epoch)."""
    import psutil

    return psutil.Process(os.getpid()).create_time()


def mark(name: str) -> None:
    """Phase `name` ended now (in this process)."""
    _MARKS[name] = time.time()


def marks_add(name: str, when: float) -> None:
    """Phase `name` ended at wall-clock time `when`."""
    _MARKS[name] = when


def marks() -> dict[str, float]:
    return dict(_MARKS)


def since(launch: float, timeline: dict[str, float]) -> dict[str, float]:
    """The timeline as seconds since `launch`, in time order."""
    return {k: round(v - launch, 2) for k, v in sorted(timeline.items(), key=lambda kv: kv[1])}
