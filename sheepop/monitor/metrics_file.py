"""Readers of a run's metrics.jsonl (written by sheepop.train.metrics.MetricsSink on rank 0).

After a worker restart the replayed steps appear again: readers take the last record of a step.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsTail:
    """metrics.jsonl read incrementally: each read() parses only what was appended since the
    last one (a live view polls every 0.5 s; re-parsing a 100k-step file took 0.35 s a poll)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._pos = 0
        self._partial = b""
        self.restarted = False  # the last read() started over (the file was replaced or truncated)

    def read(self) -> list[dict]:
        """The rows appended since the previous call (all of them on the first)."""
        self.restarted = False
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self._pos:
                    self._pos, self._partial, self.restarted = 0, b"", True
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line being written right now
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def latest_per_step(rows: list[dict], key: str, skip_warmup: bool = False) -> tuple[list[int], list[float]]:
    """(steps, values) for `key`; after a restart the re-run steps replace the earlier ones.

    skip_warmup: leave out the first step each attempt logged (compilation, warm-up, the
    checkpoint just loaded), unless nothing else is left: for typical speeds, not the curve."""
    by_step: dict[int, tuple[float, bool]] = {}
    first, attempt = True, None
    for r in rows:
        if r.get("event") in ("start", "resume") or r.get("attempt", attempt) != attempt:
            first = True  # a new attempt begins (a row's attempt tells it when no event did)
        attempt = r.get("attempt", attempt)
        if "event" not in r and r.get(key) is not None:
            by_step[r["step"]] = r[key], first
            first = False
    steps = sorted(by_step)
    if skip_warmup and any(not by_step[s][1] for s in steps):
        steps = [s for s in steps if not by_step[s][1]]
    return steps, [by_step[s][0] for s in steps]


RUN_FILES = ("config.yaml", "metrics.jsonl", "tokenizer.json", "loss.png", "sample.txt")


def local_run(location: str | Path) -> Path:
    """A run folder to read on this machine: the folder itself, or for a run in storage
    (`s3://bucket/prefix/<run.name>`) a local copy of its own files (not its checkpoints)."""
    from sheepop import storage

    if not storage.is_uri(location):
        return storage.local_path(location)
    local = storage.cache_dir(location)
    present = storage.sizes(location)
    storage.download(location, local, [f for f in RUN_FILES if f in present])
    return local


class StorageFollower:
    """Keeps the local copy of a run in storage fresh (metrics.jsonl, config.yaml) for `sheepop
    watch s3://...`: a background thread copies them every `every` seconds."""

    def __init__(self, location: str, local: Path, every: float = 5.0):
        import threading

        self.location, self.local, self.every = location, local, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-storage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from sheepop import storage

        while not self._stop.wait(self.every):
            for f in ("metrics.jsonl", "config.yaml"):
                try:
                    data = storage.read_bytes(storage.join(self.location, f))
                except OSError:
                    continue
                target = self.local / f
                if not target.is_file() or target.stat().st_size != len(data):
                    tmp = target.with_name(f".{f}.part")
                    tmp.write_bytes(data)
                    tmp.replace(target)

    def stop(self) -> None:
        self._stop.set()
