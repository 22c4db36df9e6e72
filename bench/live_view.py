"""Cost of one live-view poll on a long run's metrics.jsonl: re-reading the whole file vs the
incremental tail the live view and `sheepop watch` use, measured in the same run.

  python bench/live_view.py [rows=100000] [new=20]

Writes a synthetic metrics.jsonl of `rows` step lines (the fields a real run logs) to a temp
folder; each poll then appends `new` lines (a 0.5 s poll sees a few steps of a fast run).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from sheepop.cli.args import bench_options
from sheepop.monitor.live import Progress, Snapshot
from sheepop.monitor.metrics_file import MetricsTail, read_metrics

POLLS = 5


def row(step: int) -> str:
    return json.dumps({"time": 1e9 + step, "step": step, "loss": 3.0 + 1 / step, "lr": 3e-4, "grad_norm": 1.0,
                       "tokens": step * 4096, "tokens_per_sec": 3800.0, "step_time": 1.07, "mfu": 0.35,
                       "mem_allocated": 0.8, "peak_flops": 9.7e11}) + "\n"


def main(argv: list[str]) -> None:
    o = bench_options(argv, {"rows": int, "new": int}, "bench/live_view.py")
    rows, new = o.get("rows", 100_000), o.get("new", 20)
    run = Path(tempfile.mkdtemp(prefix="sheepop-bench-live-"))
    path = run / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "time": 1e9, "step": 0}) + "\n")
        f.writelines(row(s) for s in range(1, rows + 1))
    tail, progress = MetricsTail(run), Progress()
    progress.add(tail.read())  # the view's first frame reads everything once, either way
    step, full, incremental = rows, [], []
    for _ in range(POLLS):
        with open(path, "a") as f:
            f.writelines(row(s) for s in range(step + 1, step + new + 1))
        step += new
        t0 = time.perf_counter()
        a = Snapshot.from_rows(read_metrics(run), step)  # re-read and re-parse the whole file
        t1 = time.perf_counter()
        progress.add(tail.read())  # parse only the appended lines
        b = progress.snapshot(step)
        t2 = time.perf_counter()
        assert a == b
        full.append(t1 - t0)
        incremental.append(t2 - t1)
    size = path.stat().st_size / 1e6
    print(f"metrics.jsonl of {step:,} steps ({size:.1f} MB), {new} new lines per poll, best of {POLLS} polls")
    print(f"{'poll':<34}{'ms':>10}")
    print(f"{'re-read the whole file':<34}{1000 * min(full):>10.1f}")
    print(f"{'incremental tail (live view)':<34}{1000 * min(incremental):>10.1f}")
    print(f"ratio: {min(full) / min(incremental):.0f}x less work per poll; at one poll per 0.5 s the full re-read "
          f"keeps {min(full) / 0.5:.0%} of a core busy")


if __name__ == "__main__":
    main(sys.argv[1:])
