"""Start and stop a server process on loopback for a test (the S3 and GCS servers): its output in a
log file, ready once a URL answers, stopped by PID."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def start(cmd: list[str], log_path: Path, ready_url: str, what: str, env: dict | None = None,
          timeout: float = 120) -> tuple[subprocess.Popen, object]:
    """(process, open log file) once `ready_url` answers; RuntimeError if it exits or never answers."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                return proc, log
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop(proc, log)
                raise RuntimeError(f"{what} did not start ({ready_url}); its log: {log_path}")
            time.sleep(0.1)


def stop(proc: subprocess.Popen, log) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()
