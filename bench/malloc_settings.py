"""Training steps and memory under the glibc malloc settings `sheepop train` runs with
(sheepop.cpu_allocator: its training processes keep freed memory on the heap, via mallopt; huge pages
for all) vs glibc's defaults, huge pages alone, and the same heap settings as glibc tunables that every
process of the run inherits (what `sheepop train` did until 12-07 late evening).

Each round runs `sheepop train` once per kind and setting, in a rotating order so that a machine
that slows down for a while costs every setting alike:
  - glibc defaults, 4 kB pages: GLIBC_TUNABLES=glibc.malloc.hugetlb=0 (a malloc setting of the
    user's own: sheepop adds nothing);
  - huge pages only: GLIBC_TUNABLES=glibc.malloc.hugetlb=1;
  - as inherited tunables: GLIBC_TUNABLES with mmap_max=0, trim_threshold=4 GiB, top_pad=64 MiB and
    hugetlb=1, so Ray's helpers (and any process the run starts) get them too;
  - sheepop's: GLIBC_TUNABLES unset, so `sheepop train` adds huge pages and its training processes
    call mallopt (the `sheepop train` process at its start, a Ray worker when it starts training).
Prints, per kind and setting, the mean step time of the steady steps after `warmup` (what tokens/s
follow: a step that faults in fresh memory every few steps is in it, a median hides it), the
median step, the ratio of means vs the first setting (glibc's defaults unless `settings` leaves
them out), for cluster=process the minor page faults per
step of the training process, and the peak proportional set size (PSS, shared pages split between
the processes that map them) of the whole run: `sheepop train` and every process below it (a local
Ray's helpers and workers), sampled once a second.

    python bench/malloc_settings.py [model=small] [micro=8] [steps=40] [warmup=5] [rounds=2] [kinds=process,local]
        [settings=defaults,hugepages,inherited,sheepop]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sheepop.cli.args import bench_options  # noqa: E402
from sheepop.cpu_allocator import TUNABLE, glibc_version, thp_mode  # noqa: E402

# setting name → (GLIBC_TUNABLES, or None to leave it unset; (malloc_hugepages, malloc_heap_only) expected)
INHERITED = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={4 << 30}:glibc.malloc.top_pad={64 << 20}:{TUNABLE}=1"
SETTINGS = {"glibc defaults": (f"{TUNABLE}=0", (False, False)),
            "huge pages only": (f"{TUNABLE}=1", (True, False)),
            "as inherited tunables": (INHERITED, (True, False)),  # heap-only by glibc itself, not by mallopt
            "sheepop's": (None, None)}
SHORT = {"defaults": "glibc defaults", "hugepages": "huge pages only", "inherited": "as inherited tunables",
         "sheepop": "sheepop's"}


def tree_pss_mb(root: int) -> float:
    """The summed PSS of root and every process below it."""
    kids: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        kids.setdefault(ppid, []).append(int(pid))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            total += next(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup") if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


class PeakPss(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self):
        while not self.done.wait(1.0):
            self.peak = max(self.peak, tree_pss_mb(self.pid))


def run(kind: str, model: str, micro: int, steps: int, warmup: int, setting: str) -> tuple[float, float, float, float]:
    """(mean and median step seconds, minor page faults per step of the `sheepop train` process,
    peak PSS MB of it and all below it) of one run."""
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
    sampler = PeakPss(p.pid)
    sampler.start()
    err = p.stderr.read()
    sampler.done.set()
    _, status, usage = os.wait4(p.pid, 0)  # this run's own process (start-up included)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sheepop train cluster={kind} failed:\n{err[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(e for e in rows if e.get("event") == "start")
    got = (start["malloc_hugepages"], start["malloc_heap_only"])
    assert expected is None or got == expected, (setting, start)  # the setting reached the training process
    times = [row["step_time"] for row in rows if "step_time" in row and "event" not in row and row["step"] > warmup]
    return statistics.mean(times), statistics.median(times), usage.ru_minflt / (steps + warmup), sampler.peak


def main(argv):
    o = bench_options(argv, {"model": str, "micro": int, "steps": int, "warmup": int, "rounds": int, "kinds": str,
                                 "settings": str},
                      "bench/malloc_settings.py")
    model, micro, steps, warmup = o.get("model", "small"), o.get("micro", 8), o.get("steps", 40), o.get("warmup", 5)
    kinds = o.get("kinds", "process,local").split(",")
    chosen = [SHORT[k] for k in o.get("settings", ",".join(SHORT)).split(",")]
    print(f"glibc {glibc_version()}, transparent huge pages: {thp_mode()}; model={model}, micro {micro}, "
          f"{steps} timed steps after {warmup}, {o.get('rounds', 2)} rounds")
    results = {(k, s): [] for k in kinds for s in chosen}
    order = list(results)
    for r in range(o.get("rounds", 2)):
        for key in order[r % len(order):] + order[:r % len(order)]:
            results[key].append(run(key[0], model, micro, steps, warmup, key[1]))
    print(f"{'cluster':<10}{'malloc':<23}{'mean ms':>9}{'median ms':>11}{'faults/step':>13}{'peak PSS MB':>13}"
          f"  speed-up vs {chosen[0]}")
    for kind in kinds:
        base = statistics.median(x[0] for x in results[(kind, chosen[0])])  # glibc's defaults unless left out
        for setting in chosen:
            xs = results[(kind, setting)]
            mean, median = statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)
            faults = f"{statistics.median(x[2] for x in xs):,.0f}" if kind == "process" else "-"
            peak = statistics.median(x[3] for x in xs)
            print(f"{kind:<10}{setting:<23}{1000 * mean:>9.0f}{1000 * median:>11.0f}{faults:>13}{peak:>13,.0f}"
                  f"{base / mean:>14.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
