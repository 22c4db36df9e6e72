"""What a local Ray's own processes cost a `cluster=local` training run, and what turning them down buys.

Two measurements, each of `sheepop train cluster=local` (model=small, micro 8, no saves, no evals),
the median step_time of `seconds` of training after the first 5 logged steps:

  dashboard: rounds of one run with Ray's dashboard (cluster.dashboard=true) and one
     without, in alternating order; also the resident memory of all Ray processes (the worker
     included) and the time to the 5th logged step.
  phases: one run with the dashboard on (after `seconds` of settling) whose phases differ in what
     else may use the CPU, each against the same baseline: Ray's processes and the worker's
     non-compute threads at nice 19 (then back at 0), then Ray's helper processes frozen
     (SIGSTOP: they never wake) one group after another (sheepop's StopFlag actor, the
     dashboard's processes, Ray Train's SynchronizationActor), then all thawed. A frozen process
     is what removing it would give at best.
  policy (only when asked: what=policy): one run whose phases alternate the scheduling policy of
     Ray's processes and the worker's non-compute threads: SCHED_OTHER (the default), SCHED_BATCH,
     SCHED_OTHER, SCHED_IDLE, `rounds` times. A BATCH or IDLE thread that wakes does not preempt a
     running compute thread; it waits for the next tick or an idle core.

    python bench/local_ray_cost.py [what=dashboard,phases|policy] [rounds=3] [seconds=25] [model=small] [micro=8]
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sheepop.cli.args import bench_options  # noqa: E402

DASHBOARD = ("ray-dashboard", "dashboard/dashboard.py", "ray::DashboardAgent", "dashboard/agent.py")
RAY = ("ray/core/src", "ray::", "dashboard", "runtime_env", "gcs_server", "raylet")


class Run:
    """One `sheepop train cluster=local` in the background, stopped cleanly at the end."""

    def __init__(self, model: str, micro: int, *overrides: str):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-local-ray-"))
        data = Path(os.environ.get("SHEEPOP_BENCH_DATA", "/tmp/sheepop-bench/data/stdlib-3mb"))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sheepop.cli", "train", f"model={model}", "cluster=local", "parallelism=ddp",
             "trainer.global_batch_size=0", f"trainer.micro_batch_size={micro}", "trainer.max_steps=100000",
             "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false", "logger=none",
             f"run.dir={self.dir}", "data.max_bytes=3000000", f"data.out_dir={data}-v{model}", *overrides],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "WANDB_MODE": "disabled"})

    def step_times(self) -> list[float]:
        try:
            return [json.loads(line)["step_time"] for line in open(self.dir / "metrics.jsonl") if '"step_time"' in line]
        except FileNotFoundError:
            return []

    def warm(self) -> float:
        """Seconds from the launch to the 5th logged step."""
        while len(self.step_times()) < 5:
            if self.proc.poll() is not None:
                raise SystemExit(f"sheepop train cluster=local failed:\n{self.proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        return time.monotonic() - self.t0

    def median_over(self, seconds: float) -> float:
        n = len(self.step_times())
        time.sleep(seconds)
        return statistics.median(self.step_times()[n:])

    def stop(self) -> None:
        (self.dir / "STOP").write_text("bench done")
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def processes(names: tuple[str, ...]) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        except OSError:
            continue
        if int(pid) != os.getpid() and any(n in cmd for n in names):
            out.append(int(pid))
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")).split()[1])
        except (OSError, StopIteration):
            pass
    return total / 1024


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def cpu_ticks(pid: int, tid: int) -> int:
    try:
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def dashboard(o: dict) -> None:
    got: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for r in range(o["rounds"]):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            run = Run(o["model"], o["micro"], f"cluster.dashboard={str(on).lower()}")
            try:
                warm = run.warm()
                step = run.median_over(o["seconds"])
                mem = rss_mb(processes(RAY))
            finally:
                run.stop()
            got[on].append((step, mem, warm))
            print(f"  dashboard={str(on).lower():<5} median step {step * 1000:.0f} ms, Ray's processes "
                  f"{mem:,.0f} MB resident, 5th step after {warm:.1f} s", flush=True)
    med = {on: [statistics.median(v[i] for v in got[on]) for i in range(3)] for on in got}
    print(f"dashboard off vs on (median of {o['rounds']} rounds): step time {med[False][0] / med[True][0]:.3f}×, "
          f"Ray's memory {med[False][1] - med[True][1]:+,.0f} MB, time to the 5th step "
          f"{med[False][2] - med[True][2]:+.1f} s")


def phases(o: dict) -> None:
    run = Run(o["model"], o["micro"], "cluster.dashboard=true")  # its processes are one of the groups frozen
    frozen: list[int] = []
    try:
        run.warm()
        run.median_over(o["seconds"])  # settling: the first steps after the 5th are still slower
        base = run.median_over(o["seconds"])
        print(f"  baseline: {base * 1000:.0f} ms", flush=True)

        def phase(name: str) -> None:
            t = run.median_over(o["seconds"])
            print(f"  {name:<58} {t * 1000:.0f} ms  {t / base:.3f}× baseline", flush=True)

        quiet = quiet_threads(run)
        for nice in (19, 0):
            for _, tid in quiet:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                except OSError:
                    pass  # a thread that ended
            phase("Ray's processes, the worker's other threads at nice 19" if nice else "all back at nice 0")
        groups = (("sheepop's StopFlag actor", ("ray::StopFlag",)), ("the dashboard's processes", DASHBOARD),
                  ("Ray Train's SynchronizationActor", ("ray::SynchronizationActor",)))
        for k, (name, names) in enumerate(groups):
            for pid in processes(names):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
            phase(f"frozen: {'+ ' if k else ''}{name}")
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []
        phase("all thawed")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        run.stop()


def policy(o: dict) -> None:
    """Ray's processes and the worker's non-compute threads under SCHED_BATCH / SCHED_IDLE, phases
    alternating with SCHED_OTHER in one run: a BATCH or IDLE thread that wakes never preempts a
    running one (the kernel's wake-up preemption skips them), so it waits for a tick or an idle core."""
    run = Run(o["model"], o["micro"])
    try:
        run.warm()
        run.median_over(o["seconds"])  # settling
        quiet = quiet_threads(run)
        names = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_BATCH: "SCHED_BATCH", os.SCHED_IDLE: "SCHED_IDLE"}
        got: dict[int, list[float]] = {k: [] for k in names}
        for _ in range(o["rounds"]):
            for pol in (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_OTHER, os.SCHED_IDLE):
                for _, tid in quiet:
                    try:
                        os.sched_setscheduler(tid, pol, os.sched_param(0))
                    except OSError:
                        pass  # a thread that ended
                t = run.median_over(o["seconds"])
                got[pol].append(t)
                print(f"  {names[pol]:<12} {t * 1000:.0f} ms", flush=True)
        base = statistics.mean(got[os.SCHED_OTHER])
        print("  mean: " + ", ".join(f"{names[k]} {statistics.mean(v) * 1000:.0f} ms ({base / statistics.mean(v):.3f}x)"
                                     for k, v in got.items()))
    finally:
        run.stop()


def quiet_threads(run: Run) -> list[tuple[int, int]]:
    """(pid, tid) of every thread of the local Ray but the training worker's two busiest."""
    worker = processes(("ray::RayTrainWorker",))[0]
    before = {t: cpu_ticks(worker, t) for t in threads_of(worker)}
    time.sleep(2)
    compute = sorted(before, key=lambda t: before[t] - cpu_ticks(worker, t))[:2]  # the two busiest
    others = [(p, t) for p in processes(RAY) if p != worker and p != run.proc.pid for t in threads_of(p)]
    return others + [(worker, t) for t in threads_of(worker) if t not in compute]


def main(argv: list[str]) -> None:
    o = {"what": "dashboard,phases", "rounds": 3, "seconds": 25.0, "model": "small", "micro": 8,
         **bench_options(argv, {"what": str, "rounds": int, "seconds": float, "model": str, "micro": int},
                         "bench/local_ray_cost.py")}
    print(f"{os.cpu_count()} CPUs; sheepop train cluster=local model={o['model']}, micro {o['micro']}; "
          f"median step of {o['seconds']:g} s of training")
    for what in o["what"].split(","):
        print(f"\n{what}:")
        {"dashboard": dashboard, "phases": phases, "policy": policy}[what](o)


if __name__ == "__main__":
    main(sys.argv[1:])
