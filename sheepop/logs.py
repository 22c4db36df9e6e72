"""Library output goes to files in run.dir/logs/, not to the user's terminal.

A user sees sheepop's own lines and real errors. What Ray, Ray Train and DeepSpeed print while a
run works (worker-group set-up, per-checkpoint lines, JIT-build notices, C++ log lines) is
written to run.dir/logs/: each training rank's stdout and stderr to `rank<N>.log` (file
descriptors, so C++ output is caught too), and for a Ray instance sheepop started itself, Ray's
own session logs are copied to `logs/ray/` when the run ends.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

LOGS = "logs"


def logs_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOGS


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (fd 1 and 2, and Python's sys.stdout/stderr) to
    `path`, appending; restored on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def library_logger_to(logger: logging.Logger, path: Path) -> None:
    """A library's Python logger writes to `path` instead of the terminal. With cluster=process the
    rank shares the terminal with sheepop's own lines, so its fd-level redirect (`output_to`, what
    a Ray worker gets) cannot be used there: DeepSpeed's warnings would cross the live view."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for h in list(logger.handlers):  # the terminal's, and an earlier run's file (one process, several runs)
        if type(h) is logging.StreamHandler or getattr(h, "sheepop_run_log", False):
            logger.removeHandler(h)
            if getattr(h, "sheepop_run_log", False):
                h.close()
    handler = logging.FileHandler(path)
    handler.sheepop_run_log = True
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d] %(message)s"))
    logger.addHandler(handler)


def copy_ray_session_logs(run_dir: str | Path) -> Path | None:
    """Copy the logs of the Ray instance this process started into run.dir/logs/ray/."""
    from sheepop import compat

    src = compat.ray_session_logs_dir()
    if src is None or not src.is_dir():
        return None
    dst = logs_dir(run_dir) / "ray"
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "events", "*.pid"))
    return dst
