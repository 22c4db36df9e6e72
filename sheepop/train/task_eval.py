"""trainer.eval_tasks: lm-evaluation-harness tasks on the run's own checkpoints while it trains.

Rank 0 hands every checkpoint whose step is a multiple of trainer.eval_tasks_every to a
background thread. The thread waits until the checkpoint is complete (Ray Train may still be
uploading it), then runs `sheepop eval run.dir=CKPT tasks=... out=...` in a child process: on the
CPU, with one thread and a lower priority, so training never waits for it and the child holds no
accelerator memory. One evaluation runs at a time; a checkpoint that comes while one runs waits,
and a newer one replaces it (the newest model is the one worth scoring). The loop collects
finished scores on its logged steps (`poll`) and waits for the last one at the end (`close`).

Scores are logged as `tasks/<task>/<metric>` at the checkpoint's step (W&B plots them against
`tasks/step`, since its own step has moved on by then). A failed evaluation is a `tasks_failed`
event with the child's last error line; training goes on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from sheepop import storage
from sheepop.eval_tasks import TASKS_DIR
from sheepop.train import checkpoint_files

COMPLETE_TIMEOUT_S = 600  # how long a checkpoint may take to become complete in storage


def shipped_tasks() -> list[str]:
    """The task names in sheepop/eval_tasks (what lm_eval's TaskManager finds there), without importing
    it: each YAML's top-level `task:` line (a plain YAML load would trip on lm_eval's !function tags)."""
    import re

    return sorted(m.group(1) for p in TASKS_DIR.glob("*/*.yaml")
                  if (m := re.search(r"^task:\s*['\"]?([^'\"\s#]+)", p.read_text(), re.M)))


def check_tasks(tasks: list[str]) -> None:
    """The driver's check of trainer.eval_tasks, before any worker starts: the harness is installed
    and every task is one sheepop ships."""
    import importlib.util

    from sheepop.errors import UserError

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("trainer.eval_tasks needs EleutherAI's lm-evaluation-harness; install it with "
                        "pip install 'sheepop[eval]' (or pip install 'lm-eval>=0.4')")
    valid = shipped_tasks()
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise UserError(f"trainer.eval_tasks={tasks}: no such task {', '.join(unknown)}; valid: {', '.join(valid)}")


class TaskEval:
    def __init__(self, cfg, rank: int, run_dir: Path):
        t = cfg.trainer
        self.enabled = bool(t.eval_tasks) and t.eval_tasks_every > 0  # the same on every rank: due() saves
        self.on = rank == 0 and self.enabled  # rank 0 runs the evaluations
        self.tasks, self.every, self.limit = list(t.eval_tasks), t.eval_tasks_every, t.eval_tasks_limit
        self.out_dir = run_dir / "eval"
        self.log = run_dir / "logs" / "eval_tasks.log"
        self._lock = threading.Lock()
        self._next: tuple[int, str] | None = None
        self._thread: threading.Thread | None = None
        self._done: list[dict] = []

    def due(self, step: int) -> bool:
        """Whether `step` is scored (every rank agrees: the loop saves a checkpoint for it)."""
        return self.enabled and step % self.every == 0

    def submit(self, step: int, ckpt: str) -> None:
        """Score checkpoint `ckpt` (saved at `step`) when the evaluation before it is done (rank 0)."""
        if not self.on:
            return
        with self._lock:
            self._next = (step, ckpt)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="eval-tasks", daemon=True)
                self._thread.start()

    def poll(self) -> list[dict]:
        """Results finished since the last call: {"step", "scores": {key: value}, "seconds"} or
        {"step", "error"}."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self, timeout_s: float = 1800) -> list[dict]:
        """Wait for the evaluation running and the one waiting (the run's last checkpoint); their results."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return self.poll()

    def _work(self) -> None:
        while True:
            with self._lock:
                job, self._next = self._next, None
                if job is None:
                    self._thread = None
                    return
            result = self._evaluate(*job)
            with self._lock:
                self._done.append(result)

    def _evaluate(self, step: int, ckpt: str) -> dict:
        t0 = time.time()
        deadline = time.monotonic() + COMPLETE_TIMEOUT_S
        while (why := checkpoint_files.problem(ckpt)) is not None:
            if time.monotonic() > deadline:
                return {"step": step, "error": f"checkpoint {ckpt} did not complete: {why}"}
            time.sleep(1.0)
        out = self.out_dir / f"tasks_step_{step:07d}.json"
        cmd = [sys.executable, "-m", "sheepop", "eval", f"run.dir={storage.normalize(ckpt)}",
               f"tasks={','.join(self.tasks)}", f"out={out}"]
        if self.limit:
            cmd.append(f"limit={self.limit}")
        # One CPU thread, no accelerator, lower priority: the training processes keep the machine.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            log.write(f"--- step {step}: {' '.join(cmd)}\n")
            log.flush()
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None)
            log.write(r.stderr)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            return {"step": step, "error": lines[-1] if lines else f"sheepop eval exited with {r.returncode}"}
        table = json.loads(out.read_text())["table"]
        scores = {f"tasks/{row['task']}/{row['metric']}": row["value"] for row in table}
        return {"step": step, "scores": scores, "seconds": round(time.time() - t0, 1)}
