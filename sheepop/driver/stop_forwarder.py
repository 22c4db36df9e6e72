"""The driver's half of a graceful stop on Ray: signals in, stop requests out to every rank.

SIGINT or SIGTERM to the driver (Ctrl-C; `sheepop stop`, which is Ray Jobs' SIGTERM to the
entrypoint; a Slurm `--signal`; a Kubernetes pod stop) writes run.dir/STOP and sets the run's
StopFlag actor: every rank finishes its step, saves a checkpoint and returns. A second signal,
or $SHEEPOP_STOP_GRACE_S seconds without the run ending, aborts (KeyboardInterrupt in the
driver; Ray tears the workers down).

A node that runs ranks and is being drained (`ray drain-node`, a cloud autoscaler's spot notice)
gets a one-shot save request: every rank checkpoints at its next step, before the deadline, and
training goes on; when the node goes, Ray Train restarts the group from that checkpoint (on fewer
workers with cluster.min_workers).

The signal handler only records the signal: Ray calls happen on the forwarder's thread, never
inside a handler that may interrupt a Ray call on the main thread.
"""
from __future__ import annotations

import _thread
import os
import signal
import threading
import time
from pathlib import Path

from sheepop import compat
from sheepop.train.stop import SAVE, STOP, STOP_FILE

GRACE_ENV = "SHEEPOP_STOP_GRACE_S"  # set by `sheepop submit --stop-grace`


def write_stop_file(run_dir: Path, reason: str) -> None:
    """run.dir/STOP holding the reason, whole at once: a rank polling it between the file's creation
    and its write would read it empty and report "run.dir/STOP exists" (seen once in the suite)."""
    tmp = Path(run_dir) / f".{STOP_FILE}.tmp"
    tmp.write_text(reason + "\n")
    os.replace(tmp, Path(run_dir) / STOP_FILE)


class StopForwarder:
    DRAIN_POLL_S = 2.0  # how often the driver looks for draining nodes (a spot notice gives 30-120 s)

    def __init__(self, run_dir: Path, flag, say=print, tick_s: float = 0.5):
        self.run_dir, self.flag, self.say, self.tick_s = Path(run_dir), flag, say, tick_s
        self.reason: str | None = None
        self.asked_at: float | None = None
        self.grace = float(os.environ.get(GRACE_ENV) or 0) or None
        self._pending: list[tuple[str, str]] = []  # (kind, reason) to send to the flag
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stop-forwarder", daemon=True)
        self._old: dict = {}
        self._drains_seen: set[str] = set()
        self._drain_checked = 0.0

    def __enter__(self) -> "StopForwarder":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handler(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:
            raise KeyboardInterrupt  # second signal: abort now
        self.reason, self.asked_at = f"{name} received by the driver", time.monotonic()
        write_stop_file(self.run_dir, self.reason)  # ranks on this machine read it at once
        self.request(STOP, self.reason)
        self.say(f"[yellow]{name}: stopping; every rank saves a checkpoint at the end of its step "
                 f"({'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again to abort)[/]")

    def request(self, kind: str, reason: str) -> None:
        """Queue a request for the ranks (any thread; the forwarder thread sends it)."""
        with self._lock:
            self._pending.append((kind, reason))

    def _run(self) -> None:
        while not self._done.wait(self.tick_s):
            with self._lock:
                todo, self._pending = self._pending, []
            for kind, reason in todo:
                try:
                    self.flag.set.remote(kind, reason)
                except Exception:  # Ray is shutting down: the STOP file still reaches local ranks
                    pass
            if time.monotonic() - self._drain_checked > self.DRAIN_POLL_S:
                self._drain_checked = time.monotonic()
                self._check_drains()
            if self.grace and self.asked_at is not None and time.monotonic() - self.asked_at > self.grace:
                self.say(f"[red]the run did not stop within {GRACE_ENV}={self.grace:g} s; aborting[/]")
                self.asked_at = None
                _thread.interrupt_main()

    def _check_drains(self) -> None:
        try:
            import ray

            draining = compat.ray_draining_nodes()
            if not draining:
                return
            ranks = ray.get(self.flag.nodes.remote(), timeout=10)
        except Exception:  # the cluster is busy or going away: look again at the next poll
            return
        for node, deadline_ms in draining.items():
            hosted = sorted(r for r, n in ranks.items() if n == node)
            if node in self._drains_seen or not hosted:
                continue
            self._drains_seen.add(node)
            left = f", deadline in {max(0.0, deadline_ms / 1000 - time.time()):.0f} s" if deadline_ms else ""
            reason = f"node {node[:12]} (rank(s) {hosted}) is being drained{left}"
            self.request(SAVE, reason)
            self.say(f"[yellow]{reason}: every rank saves a checkpoint at its next step[/]")
