"""Requests that reach a running loop from outside: stop (save, then exit) or save now.

Where a request comes from:
  - SIGINT/SIGTERM to the process running the loop on its main thread (cluster=process): a
    first signal asks for a clean stop, a second one aborts;
  - `touch <run.dir>/STOP` from another shell (ranks on this machine);
  - the run's StopFlag actor (cluster=local|ray), which the driver sets when it gets SIGINT or
    SIGTERM (Ctrl-C, `sheepop stop`, a Slurm `--signal`, a Kubernetes pod stop) and, as a
    one-shot save request, when a node that runs ranks is being drained (a spot notice).
Ray Train runs the loop off the main thread, so workers never see signals themselves: rank 0
polls the actor from a thread. The loop's per-step all-reduce carries every rank's request, so
all ranks act on it at the same step.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

STOP_FILE = "STOP"
STOP, SAVE = "stop", "save"  # what a request asks for
STOPPED_EXIT_CODE = 75  # the run saved a checkpoint and stopped on request (EX_TEMPFAIL: run it again to resume)
POLL_S = 1.0  # how often rank 0 asks the StopFlag actor (a stop waits at most this plus one step)


class StopFlag:
    """The run's request board, a Ray actor owned by the driver (see `flag_actor`). A stop is
    sticky; each save request counts once (a rank acts on a save number it has not seen)."""

    def __init__(self):
        self.stop_reason: str | None = None
        self.saves = 0
        self.save_reason = ""
        self.rank_nodes: dict[int, str] = {}  # rank → Ray node id (where a drain matters)

    def register(self, rank: int, node_id: str) -> None:
        self.rank_nodes[rank] = node_id

    def nodes(self) -> dict[int, str]:
        return dict(self.rank_nodes)

    def set(self, kind: str, reason: str) -> None:
        if kind == STOP:
            self.stop_reason = self.stop_reason or reason
        else:
            self.saves += 1
            self.save_reason = reason

    def get(self) -> tuple[str | None, int, str]:
        return self.stop_reason, self.saves, self.save_reason


def flag_actor(name: str):
    """Create the named StopFlag actor (the driver does, before the workers start)."""
    import ray

    return ray.remote(num_cpus=0)(StopFlag).options(name=name, lifetime=None).remote()


class StopRequest:
    """One rank's view of the requests. `poll()` once per step: (stop reason or None, save reason or None)."""

    def __init__(self, run_dir: Path, channel: str | None = None, rank: int = 0):
        self.file = Path(run_dir) / STOP_FILE
        self.signalled: str | None = None
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():  # Ray workers: not the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        self._remote: tuple[str | None, int, str] = (None, 0, "")
        self._saves_seen = 0
        self._done = threading.Event()
        self._thread = None
        self.node_id = _register(channel, rank) if channel else None  # the Ray node this rank runs on
        if channel and rank == 0:
            # Requests made before this rank started (a restarted group) are not this group's to act on.
            _, self._saves_seen, _ = self._remote = _ask(channel)
            self._thread = threading.Thread(target=self._poll_actor, args=(channel,), name="stop-flag", daemon=True)
            self._thread.start()

    def _handler(self, signum, _frame):
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = f"{signal.Signals(signum).name} received"

    def _poll_actor(self, name: str) -> None:
        import ray

        handle = None
        while not self._done.wait(POLL_S):
            try:
                handle = handle or ray.get_actor(name)
                self._remote = ray.get(handle.get.remote(), timeout=10)
            except Exception:  # the driver is gone or busy: keep training, ask again
                handle = None

    def poll(self) -> tuple[str | None, str | None]:
        """(why to stop, or None; why to save now, or None). A save request is returned once."""
        remote_stop, saves, save_reason = self._remote
        stop = self.signalled or remote_stop or self._stop_file()
        save = None
        if saves > self._saves_seen:
            self._saves_seen, save = saves, save_reason
        return stop, save

    def _stop_file(self) -> str | None:
        try:
            return self.file.read_text().strip() or "run.dir/STOP exists"
        except FileNotFoundError:
            return None
        except OSError:
            return "run.dir/STOP exists"

    def close(self) -> None:
        self._done.set()
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _register(channel: str, rank: int) -> str | None:
    """Tell the driver which node this rank runs on (a drain of that node asks for a checkpoint); that node."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        ray.get_actor(channel).register.remote(rank, node)
    except Exception:  # no driver to tell: drains then go unnoticed, nothing else changes
        pass
    return node


def _ask(channel: str) -> tuple[str | None, int, str]:
    import ray

    try:
        return ray.get(ray.get_actor(channel).get.remote(), timeout=10)
    except Exception:
        return None, 0, ""
