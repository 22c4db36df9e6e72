"""trainer.profile=true: a torch.profiler trace of a few training steps, one file per rank.

The trace (`run.dir/profile/rank<R>.<time in ns>.pt.trace.json`) opens in Perfetto
(ui.perfetto.dev) or TensorBoard's profiler plugin and shows where a step's time goes: the
model's kernels, DeepSpeed's optimizer step and collectives, data loading, host syncs. The first
`trainer.profile_start` steps of the process run unprofiled (start-up and the allocator's warm-up
would dominate), then one warm-up step and `trainer.profile_steps` recorded ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler


class StepProfiler:
    def __init__(self, enabled: bool, out_dir: Path, rank: int, start: int, steps: int,
                 on_written: Callable[[Path], None] = lambda d: None):
        self._prof = None
        if not enabled:
            return
        write = tensorboard_trace_handler(str(out_dir), worker_name=f"rank{rank}")

        def written(prof) -> None:
            write(prof)
            on_written(out_dir)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities, on_trace_ready=written,
                             schedule=schedule(wait=max(start - 1, 0), warmup=1, active=steps, repeat=1))
        self._prof.start()

    def step(self) -> None:
        """After each optimizer step."""
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        """Stops it (a run shorter than the schedule writes what it recorded, if anything)."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None
