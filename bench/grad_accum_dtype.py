"""What bf16 gradient accumulation costs in loss, against fp32 accumulation, at 16 micro-batches
per step: three `sheepop train` runs on the same data and seed, measured in the same run.

  python bench/grad_accum_dtype.py [model=tiny] [steps=40] [accum=16] [stage=2]

  1. precision=fp32                               the reference (fp32 weights, gradients, sums)
  2. precision=bf16 trainer.grad_accum_dtype=fp32 DeepSpeed's bf16 mode, fp32 accumulators (auto's choice)
  3. precision=bf16 trainer.grad_accum_dtype=bf16 bf16 mode, gradients summed in bf16

It prints each bf16 run's mean and last-10-steps |loss - reference| and the ratio of the two
bf16 runs' deviations. On a CPU without native bf16 (no avx512_bf16/amx) bf16 is emulated: slow,
but numerically the same arithmetic. Memory: `python bench/zero_memory.py grad_accum=fp32|bf16`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sheepop.cli.args import bench_options
from sheepop.monitor.metrics_file import latest_per_step, read_metrics

DATA = ["data.max_bytes=3000000", "data.out_dir=/tmp/sheepop-bench/data/stdlib-3mb-v1024"]


def run(out: Path, model: str, steps: int, accum: int, stage: int, *extra: str) -> list[float]:
    args = [sys.executable, "-m", "sheepop", "train", f"model={model}", "trainer=quick", "cluster=process",
            "logger=none", f"run.dir={out}", *DATA, f"parallelism.zero_stage={stage}",
            f"trainer.max_steps={steps}", "trainer.micro_batch_size=1", f"trainer.global_batch_size={accum}",
            "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false", *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore::FutureWarning"}
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{' '.join(extra)}: exit {r.returncode}\n{r.stderr[-2000:]}")
    return latest_per_step(read_metrics(out), "loss")[1]


def main(argv: list[str]) -> None:
    o = bench_options(argv, {"model": str, "steps": int, "accum": int, "stage": int}, "bench/grad_accum_dtype.py")
    model, steps, accum, stage = o.get("model", "tiny"), o.get("steps", 40), o.get("accum", 16), o.get("stage", 2)
    with tempfile.TemporaryDirectory() as tmp:
        ref = run(Path(tmp, "reference"), model, steps, accum, stage, "trainer.precision=fp32")
        dev = {}
        for accum_dtype in ("fp32", "bf16"):
            loss = run(Path(tmp, f"accumulate-{accum_dtype}"), model, steps, accum, stage, "trainer.precision=bf16",
                       f"trainer.grad_accum_dtype={accum_dtype}")
            diffs = [abs(a - b) for a, b in zip(loss, ref)]
            dev[accum_dtype] = (sum(diffs) / len(diffs), sum(diffs[-10:]) / len(diffs[-10:]), loss[-1])
    print(f"model={model}, ZeRO-{stage}, micro 1 × {accum} accumulation steps, {steps} steps; "
          f"reference precision=fp32 ends at loss {ref[-1]:.4f}")
    print(f"{'bf16 weights, accumulate in':<30}{'mean |Δloss|':>14}{'last 10':>10}{'final loss':>12}")
    for k, (mean, last10, final) in dev.items():
        print(f"{k:<30}{mean:>14.4f}{last10:>10.4f}{final:>12.4f}")
    print(f"bf16 accumulation deviates {dev['bf16'][0] / max(dev['fp32'][0], 1e-12):.2f}× as much as fp32 "
          f"accumulation from the fp32 reference (mean over all steps)")


if __name__ == "__main__":
    main(sys.argv[1:])
