"""Who else wants the CPU while `sheepop train` runs: wake-ups and preemptions, cluster=process vs local.

Runs `sheepop train` (model=small, micro 8, no saves, no evals) once per kind. Once training is
under way it reads /proc for every thread on the machine twice, `seconds` apart, and prints:
  - the CPU (in cores) of the busiest threads: the compute threads of the training process;
  - how often each compute thread was preempted (involuntary context switches per second): on a
    machine whose cores the compute threads fill, every wake-up of another thread takes a core
    from one of them, and the other compute thread then waits for it at the next barrier;
  - the wake-ups per second of every thread on the machine (voluntary context switches: a thread
    that sleeps and wakes again), in total and the top `top` of them.
A local Ray adds its processes (raylet, GCS, dashboard, the Train controller, sheepop's StopFlag
actor, Ray Train's SynchronizationActor), each with timers of its own.

    python bench/cpu_contention.py [model=small] [micro=8] [seconds=25] [top=12] [kinds=process,local]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sheepop.cli.args import bench_options  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def threads() -> dict[tuple[str, str], dict]:
    """{(pid, tid): {name, process, cpu ticks, voluntary, involuntary}} of every thread on the machine."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            process = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()[:70]
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
                fields = stat[stat.rindex(")") + 2:].split()
                switches = dict(line.split(":") for line in open(f"/proc/{pid}/task/{tid}/status")
                                if "ctxt_switches" in line)
                out[(pid, tid)] = {"name": stat[stat.index("(") + 1:stat.rindex(")")], "process": process,
                                   "cpu": int(fields[11]) + int(fields[12]),
                                   "voluntary": int(switches["voluntary_ctxt_switches"]),
                                   "involuntary": int(switches["nonvoluntary_ctxt_switches"])}
        except (OSError, ValueError, KeyError):
            pass  # a thread that ended while being read
    return out


def steps_logged(run: Path) -> int:
    try:
        return sum(1 for line in open(run / "metrics.jsonl") if '"step_time"' in line)
    except FileNotFoundError:
        return 0


def measure(kind: str, model: str, micro: int, seconds: float, top: int) -> None:
    run = Path(tempfile.mkdtemp(prefix=f"bench-contention-{kind}-"))
    data = Path(os.environ.get("SHEEPOP_BENCH_DATA", "/tmp/sheepop-bench/data/stdlib-3mb"))
    proc = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train", f"model={model}", f"cluster={kind}",
                             "parallelism=ddp", "trainer.global_batch_size=0", f"trainer.micro_batch_size={micro}",
                             "trainer.max_steps=100000", "trainer.eval_every=0", "trainer.save_every=0",
                             "trainer.progress=false", "logger=none", f"run.dir={run}", "data.max_bytes=3000000",
                             f"data.out_dir={data}-v{model}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        while steps_logged(run) < 5:  # start-up and the first steps are not what this measures
            if proc.poll() is not None:
                raise SystemExit(f"sheepop train cluster={kind} failed:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.5)
        before, t0 = threads(), time.time()
        time.sleep(seconds)
        after, dt = threads(), time.time() - t0
    finally:
        (run / "STOP").write_text("bench done")  # a clean stop; killed if it takes long
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    delta = {k: {**after[k], **{f: after[k][f] - before[k][f] for f in ("cpu", "voluntary", "involuntary")}}
             for k in after if k in before}
    compute = sorted(delta.values(), key=lambda d: -d["cpu"])[:2]
    wakeups = sorted(delta.values(), key=lambda d: -d["voluntary"])
    print(f"\ncluster={kind}: {dt:.0f} s of training sampled")
    for d in compute:
        print(f"  compute thread ({d['process'][:40]}): {d['cpu'] / HZ / dt:.2f} cores, "
              f"preempted {d['involuntary'] / dt:,.0f}/s")
    print(f"  wake-ups on the machine: {sum(d['voluntary'] for d in delta.values()) / dt:,.0f}/s; the most frequent:")
    for d in wakeups[:top]:
        print(f"  {d['voluntary'] / dt:>8,.0f}/s  {d['name']:<18} {d['process'][:50]}")


def main(argv: list[str]) -> None:
    o = bench_options(argv, {"model": str, "micro": int, "seconds": float, "top": int, "kinds": str},
                      "bench/cpu_contention.py")
    print(f"{os.cpu_count()} CPUs; each run: sheepop train model={o.get('model', 'small')}, micro {o.get('micro', 8)}")
    for kind in o.get("kinds", "process,local").split(","):
        measure(kind, o.get("model", "small"), o.get("micro", 8), o.get("seconds", 25.0), o.get("top", 12))


if __name__ == "__main__":
    main(sys.argv[1:])
