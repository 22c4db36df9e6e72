"""Training steps under the glibc malloc settings `sheepop train` runs with (sheepop.cpu_allocator:
every block from the heap, freed memory kept for the next step, huge pages) vs glibc's defaults
and vs huge pages alone, the same `sheepop train` run otherwise.

Each round runs `sheepop train` once per kind and setting, in a rotating order so that a machine
that slows down for a while costs every setting alike:
  - glibc defaults, 4 kB pages: GLIBC_TUNABLES=glibc.malloc.hugetlb=0 (a malloc setting of the
    user's own: sheepop adds nothing);
  - huge pages only: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (what sheepop set up before 12-07);
  - sheepop's: GLIBC_TUNABLES unset, so `sheepop train` adds its own.
Prints, per kind and setting, the mean step time of the steady steps after `warmup` (what tokens/s
follow: a step that faults in fresh memory every few steps is in it, a median hides it), the
median step, the ratio of means vs glibc's defaults, and for cluster=process the minor page faults
per step and the peak resident memory of the training process (start-up included; a local Ray's
workers are not this script's children, so theirs are not counted).

    python bench/malloc_settings.py [model=small] [micro=8] [steps=40] [warmup=5] [rounds=2] [kinds=process,local]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sheepop.cli.args import bench_options  # noqa: E402
from sheepop.cpu_allocator import TUNABLE, glibc_version, thp_mode  # noqa: E402

# setting name → (GLIBC_TUNABLES, or None to leave it unset; (malloc_hugepages, malloc_heap_only) expected)
SETTINGS = {"glibc defaults": (f"{TUNABLE}=0", (False, False)),
            "huge pages only": (f"{TUNABLE}=1", (True, False)),
            "sheepop's": (None, None)}


def run(kind: str, model: str, micro: int, steps: int, warmup: int, setting: str) -> tuple[float, float, float, float]:
    """(mean and median step seconds, minor page faults per step, peak resident MB of the `sheepop
    train` process) of one run."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-malloc-{kind}-"))
    data = Path(os.environ.get("SHEEPOP_BENCH_DATA", "/tmp/sheepop-bench/data/stdlib-3mb"))
    tunables, expected = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update({"WANDB_MODE": "disabled", **({"GLIBC_TUNABLES": tunables} if tunables else {})})
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train", f"model={model}", f"cluster={kind}",
                          "parallelism=ddp", "trainer.global_batch_size=0", f"trainer.micro_batch_size={micro}",
                          f"trainer.max_steps={steps + warmup}", "trainer.eval_every=0", "trainer.save_every=0",
                          "trainer.eval_batches=1", "trainer.progress=false", "logger=none", f"run.dir={out}",
                          "data.max_bytes=3000000", f"data.out_dir={data}-v{model}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)  # this run's own process (start-up included)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sheepop train cluster={kind} failed:\n{err[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(e for e in rows if e.get("event") == "start")
    got = (start["malloc_hugepages"], start["malloc_heap_only"])
    assert expected is None or got == expected, (setting, start)  # the setting reached the training process
    times = [row["step_time"] for row in rows if "step_time" in row and "event" not in row and row["step"] > warmup]
    return statistics.mean(times), statistics.median(times), usage.ru_minflt / (steps + warmup), usage.ru_maxrss / 1024


def main(argv):
    o = bench_options(argv, {"model": str, "micro": int, "steps": int, "warmup": int, "rounds": int, "kinds": str},
                      "bench/malloc_settings.py")
    model, micro, steps, warmup = o.get("model", "small"), o.get("micro", 8), o.get("steps", 40), o.get("warmup", 5)
    kinds = o.get("kinds", "process,local").split(",")
    print(f"glibc {glibc_version()}, transparent huge pages: {thp_mode()}; model={model}, micro {micro}, "
          f"{steps} timed steps after {warmup}, {o.get('rounds', 2)} rounds")
    results = {(k, s): [] for k in kinds for s in SETTINGS}
    order = list(results)
    for r in range(o.get("rounds", 2)):
        for key in order[r % len(order):] + order[:r % len(order)]:
            results[key].append(run(key[0], model, micro, steps, warmup, key[1]))
    print(f"{'cluster':<10}{'malloc':<18}{'mean ms':>9}{'median ms':>11}{'faults/step':>13}{'peak MB':>9}"
          f"{'speed-up':>10}")
    for kind in kinds:
        base = statistics.median(x[0] for x in results[(kind, "glibc defaults")])
        for setting in SETTINGS:
            xs = results[(kind, setting)]
            mean, median = statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)
            faults, peak = ((f"{statistics.median(x[2] for x in xs):,.0f}", f"{max(x[3] for x in xs):,.0f}")
                            if kind == "process" else ("-", "-"))
            print(f"{kind:<10}{setting:<18}{1000 * mean:>9.0f}{1000 * median:>11.0f}{faults:>13}{peak:>9}"
                  f"{base / mean:>10.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
