"""Time from `sheepop train` to the first training step, phase by phase, for cluster=process (one
rank in the driver's process) and cluster=local (a Ray cluster started for the run, one worker).

Each kind runs `runs` times. The first warms the machine (prepared data, DeepSpeed's op, the page
cache) and is left out; each phase prints its median over the others (a 2-core host varies by
±15% from one run to the next). The phases come from rank 0's `start` event (`startup`, seconds
since the `sheepop` process began; sheepop.startup) and the first step's metrics line; `exit` is
when the process ended (end-of-run work: final eval, sample, plot, Ray shutdown).

    python bench/startup.py [model=tiny] [runs=2] [kinds=process,local]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sheepop.cli.args import bench_options  # noqa: E402

TARGETS = {"process": 8.0, "local": 15.0}  # issue #13: seconds from launch to the first step (warm machine)
PHASES = {  # what ends at each mark (sheepop.startup), in the order a run passes them
    "config": "Python start, sheepop's CLI imports",
    "compose": "Hydra compose + validation",
    "preflight": "preflight checks (imports torch, DeepSpeed; resume point; ops)",
    "data": "prepared data found and checked",
    "plan": "the run plan",
    "ray": "Ray started, stop channel placed",
    "worker_process": "Ray worker process created",
    "worker": "rank imports (torch, DeepSpeed, the loop)",
    "distributed": "process group",
    "data_verified": "data verified on the rank's node",
    "engine": "model + DeepSpeed engine built",
    "checkpoint_loaded": "checkpoint loaded",
    "first step begins": "step-0 validation done",
    "first step ends": "first optimizer step",
    "exit": "end-of-run work and exit",
}


def run_once(kind: str, model: str, data_dir: Path, run_dir: Path) -> dict[str, float]:
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "sheepop", "train", f"model={model}", "trainer=quick", f"cluster={kind}",
            "logger=none", f"run.dir={run_dir}", "data.max_bytes=3000000", f"data.out_dir={data_dir}",
            "trainer.max_steps=1", "trainer.eval_every=0", "trainer.progress=false", "trainer.resume=never"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    ended = time.time()
    if r.returncode != 0:
        sys.exit(f"{kind}: sheepop train failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(row for row in rows if row.get("event") == "start")
    timeline = dict(start["startup"])
    launch = start["time"] - timeline["engine"]  # the start event is written right after the engine mark
    first = next(row for row in rows if row.get("step") == 1 and "loss" in row)
    timeline["first step begins"] = round(first["time"] - first["step_time"] - launch, 2)
    timeline["first step ends"] = round(first["time"] - launch, 2)
    timeline["exit"] = round(ended - launch, 2)
    return timeline


def median_timeline(timelines: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's median over the runs that reached it."""
    phases = {p for t in timelines for p in t}
    return {p: statistics.median(t[p] for t in timelines if p in t) for p in phases}


def main() -> None:
    o = bench_options(sys.argv[1:], {"model": str, "runs": int, "kinds": str}, "bench/startup.py")
    model, runs = o.get("model", "tiny"), max(1, o.get("runs", 2))
    kinds = [k for k in o.get("kinds", "process,local").split(",") if k]
    data_dir = ROOT / "outputs" / "data" / "bench-stdlib-3mb"
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="sheepop-bench-startup-") as tmp:
        for kind in kinds:
            for i in range(runs):
                timeline = run_once(kind, model, data_dir, Path(tmp) / f"{kind}-{i}")
                results.setdefault(kind, []).append(timeline)
                print(f"{kind} run {i + 1}/{runs}: first step ends at {timeline['first step ends']:.1f} s",
                      file=sys.stderr)
    measured = {k: median_timeline(v[1:] or v) for k, v in results.items()}
    shown = f"median of runs 2-{runs}" if runs > 2 else ("run 2 of 2" if runs == 2 else "one cold run")
    print(f"\nseconds since `sheepop train` started (model={model}; {shown} per kind)\n")
    header = f"{'phase ends':<20}" + "".join(f"{k:>12}" for k in kinds) + "   what"
    print(header)
    print("-" * len(header))
    for phase, what in PHASES.items():
        if not any(phase in measured[k] for k in kinds):
            continue
        cells = "".join(f"{measured[k][phase]:>12.2f}" if phase in measured[k] else f"{'-':>12}" for k in kinds)
        print(f"{phase:<20}{cells}   {what}")
    print()
    for k in kinds:
        t = measured[k]["first step ends"]
        print(f"{k}: first step ends {t:.1f} s after launch; target <= {TARGETS.get(k, float('nan')):.0f} s "
              f"({t / TARGETS[k]:.2f}x the target)" if k in TARGETS else f"{k}: {t:.1f} s")


if __name__ == "__main__":
    main()
