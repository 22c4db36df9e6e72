"""Training steps with glibc's malloc on transparent huge pages (what `sheepop train` sets up,
sheepop.cpu_allocator) vs plain 4 kB pages, the same `sheepop train` run otherwise.

Each round runs `sheepop train` once per kind and page setting (GLIBC_TUNABLES=glibc.malloc.hugetlb=1
or =0; a value already set is left alone by sheepop), in a rotating order so that a machine that
slows down for a while costs both alike. Prints, per kind, the median step time of each setting
(steady steps after `warmup`, from metrics.jsonl) and the ratio; for cluster=process also the
minor page faults per step of the training process (start-up included; a local Ray's workers are
not this script's children, so their faults are not counted).

    python bench/malloc_hugepages.py [model=small] [micro=8] [steps=30] [warmup=5] [rounds=2] [kinds=process,local]
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sheepop.cli.args import bench_options  # noqa: E402
from sheepop.cpu_allocator import TUNABLE, glibc_version, thp_mode  # noqa: E402


def run(kind: str, model: str, micro: int, steps: int, warmup: int, hugepages: bool) -> tuple[float, float]:
    """(median step seconds, minor page faults per step of the `sheepop train` process) of one run."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-malloc-{kind}-"))
    data = Path(os.environ.get("SHEEPOP_BENCH_DATA", "/tmp/sheepop-bench/data/stdlib-3mb"))
    env = {**os.environ, "WANDB_MODE": "disabled", "GLIBC_TUNABLES": f"{TUNABLE}={int(hugepages)}"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-m", "sheepop.cli", "train", f"model={model}", f"cluster={kind}",
                        "parallelism=ddp", "trainer.global_batch_size=0", f"trainer.micro_batch_size={micro}",
                        f"trainer.max_steps={steps + warmup}", "trainer.eval_every=0", "trainer.save_every=0",
                        "trainer.eval_batches=1", "trainer.progress=false", "logger=none", f"run.dir={out}",
                        "data.max_bytes=3000000", f"data.out_dir={data}-v{model}"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"sheepop train cluster={kind} failed:\n{r.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's processes, start-up included
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(e for e in rows if e.get("event") == "start")
    assert start["malloc_hugepages"] is hugepages, start  # the setting reached the training process
    times = [row["step_time"] for row in rows if "step_time" in row and "event" not in row and row["step"] > warmup]
    n = steps + warmup
    return statistics.median(times), (after.ru_minflt - before.ru_minflt) / n


def main(argv):
    o = bench_options(argv, {"model": str, "micro": int, "steps": int, "warmup": int, "rounds": int, "kinds": str},
                      "bench/malloc_hugepages.py")
    model, micro, steps, warmup = o.get("model", "small"), o.get("micro", 8), o.get("steps", 30), o.get("warmup", 5)
    kinds = o.get("kinds", "process,local").split(",")
    print(f"glibc {glibc_version()}, transparent huge pages: {thp_mode()}; model={model}, micro {micro}, "
          f"{steps} timed steps after {warmup}, {o.get('rounds', 2)} rounds")
    results = {(k, h): [] for k in kinds for h in (False, True)}
    order = list(results)
    for r in range(o.get("rounds", 2)):
        for key in order[r % len(order):] + order[:r % len(order)]:
            results[key].append(run(key[0], model, micro, steps, warmup, hugepages=key[1]))
    print(f"{'cluster':<10}{'pages':<8}{'step ms':>10}{'faults/step':>14}{'speed-up':>10}")
    for kind in kinds:
        base = statistics.median(x[0] for x in results[(kind, False)])
        for huge in (False, True):
            xs = results[(kind, huge)]
            step = statistics.median(x[0] for x in xs)
            faults = f"{statistics.median(x[1] for x in xs):,.0f}" if kind == "process" else "-"
            print(f"{kind:<10}{'2 MB' if huge else '4 kB':<8}{1000 * step:>10.0f}{faults:>14}{base / step:>10.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
