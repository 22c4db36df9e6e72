"""Bytes per rank held by parameters, gradients and optimizer state under ZeRO stages 0-3,
measured from the DeepSpeed engines' tensors on 2 worker processes (gloo), as ratios to stage 0.

  python bench/zero_memory.py [model=tiny] [workers=2] [precision=bf16] [grad_accum=auto]

Each stage builds sheepop's own engine (sheepop.train.engine.build) and takes one training
step; a figure is the larger of "after backward" (gradients alive) and "after step" (AdamW state).
precision=bf16 (the default run's mode on bf16 hardware and every GPU) is DeepSpeed's bf16 mode:
bf16 weights and gradients, fp32 master and moments in the optimizer. precision=fp32 or
bf16-autocast keep fp32 weights, so stage 0 needs no master copy and the ratios differ.
grad_accum (trainer.grad_accum_dtype): bf16 mode's gradients are summed in fp32 at stages 2-3 by
default (auto): 4 bytes per element of the rank's shard; grad_accum=bf16 shows the saving.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.multiprocessing as mp

from sheepop.cli.args import bench_options
from sheepop.net import free_port

STAGES = (0, 1, 2, 3)


def _cfg(model: str, stage: int, world: int, precision: str, accum: str):
    from sheepop.config import compose

    return compose([f"model={model}", f"parallelism.zero_stage={stage}", "cluster=local",
                    f"trainer.precision={precision}", f"trainer.grad_accum_dtype={accum if stage >= 2 else 'auto'}",
                    f"cluster.num_workers={world}", "logger=none", "trainer.micro_batch_size=2",
                    "trainer.global_batch_size=0"])  # accumulation 1: every step is an optimizer step


def _worker(rank: int, world: int, port: int, model: str, precision: str, accum: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PYTHONWARNINGS="ignore::FutureWarning")
    torch.set_num_threads(1)
    from sheepop.config import batch_plan
    from sheepop.model.transformer import Transformer
    from sheepop.train import engine as eng
    from sheepop.train.memory import engine_bytes

    eng.init_distributed()
    try:
        for stage in STAGES:
            cfg = _cfg(model, stage, world, precision, accum)
            torch.manual_seed(0)
            e = eng.build(Transformer(cfg.model), cfg, batch_plan(cfg, world))
            x = torch.randint(0, cfg.model.vocab_size, (2, 32))
            e.backward(e(x, x))
            after_backward = engine_bytes(e)
            e.step()
            after_step = engine_bytes(e)
            queue.put((stage, rank, {k: max(after_backward[k], after_step[k]) for k in after_step}))
            del e
    finally:
        eng.shutdown()


def main(argv: list[str]) -> None:
    o = bench_options(argv, {"model": str, "workers": int, "precision": str, "grad_accum": str}, "bench/zero_memory.py")
    model, world, precision = o.get("model", "tiny"), o.get("workers", 2), o.get("precision", "bf16")
    accum = o.get("grad_accum", "auto")
    port = free_port()
    queue = mp.get_context("spawn").Queue()
    mp.spawn(_worker, args=(world, port, model, precision, accum, queue), nprocs=world, join=True)
    got: dict[int, dict] = {}
    for _ in range(len(STAGES) * world):
        stage, rank, b = queue.get(timeout=30)
        got.setdefault(stage, {})[rank] = b
    keys = ("params", "grads", "adam_moments", "fp32_master", "optimizer")
    print(f"model={model}, {world} workers, precision={precision}, grad_accum={accum} (stages 2-3): "
          f"bytes per rank (max over ranks), ratio to stage 0")
    print("optimizer = adam_moments (AdamW exp_avg + exp_avg_sq) + fp32_master (the optimizer's fp32 weights)")
    print(f"{'stage':<6}" + "".join(f"{k:>14}{'×':>6}" for k in keys) + f"{'total':>12}{'×':>6}")
    base = {k: max(r[k] for r in got[0].values()) for k in keys}
    base_total = base["params"] + base["grads"] + base["optimizer"]
    for stage in STAGES:
        row = {k: max(r[k] for r in got[stage].values()) for k in keys}
        total = row["params"] + row["grads"] + row["optimizer"]
        cells = "".join(f"{row[k]:>14,}" + (f"{row[k] / base[k]:>6.2f}" if base[k] else f"{'-':>6}") for k in keys)
        print(f"{stage:<6}{cells}{total:>12,}{total / base_total:>6.2f}")
    worst = max(max(r["optimizer"] for r in got[s].values()) / base["optimizer"] for s in STAGES if s)
    print(f"optimizer state per rank, stages 1-3: at most {worst:.2f}× stage 0 (target ≤ 0.55×: "
          f"{'met' if worst <= 0.55 else 'NOT met'})")


if __name__ == "__main__":
    main(sys.argv[1:])
