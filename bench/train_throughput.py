"""Training-step throughput: sheepop's DeepSpeed engine vs a plain PyTorch loop, same run.

Both time the same model (default model=small), batch, precision and optimizer settings on
this machine; the ratio shows what the engine costs at world size 1.

  python bench/train_throughput.py [model=small] [steps=20] [warmup=3] [micro=16] [precision=auto]
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch

from plain_torch import make_step
from sheepop.commands import parse_kv
from sheepop.config import compose, to_dict
from sheepop.model import ModelArgs, Transformer, flops_per_token
from sheepop.train import engine as eng


def batches(cfg, n, seq, micro):
    g = torch.Generator().manual_seed(0)
    v = cfg["model"]["vocab_size"]
    return [torch.randint(0, v, (micro, seq + 1), generator=g) for _ in range(n)]


def time_steps(step_fn, data, warmup) -> float:
    for w in data[:warmup]:
        step_fn(w)
    t0 = time.perf_counter()
    for w in data[warmup:]:
        step_fn(w)
    return time.perf_counter() - t0


def main(argv):
    o = parse_kv(argv, {"model": str, "steps": int, "warmup": int, "micro": int, "precision": str}, "bench")
    model_name, steps, warmup = o.get("model", "small"), o.get("steps", 20), o.get("warmup", 3)
    cfg = to_dict(compose([f"model={model_name}", "cluster=process", "parallelism=ddp",
                           f"trainer.micro_batch_size={o.get('micro', 16)}",
                           f"trainer.precision={o.get('precision', 'auto')}"]))
    t = cfg["trainer"]
    seq, micro = cfg["model"]["max_seq_len"], t["micro_batch_size"]
    amp = eng.autocast_dtype(t["precision"])
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp else nullcontext
    data = batches(cfg, steps + warmup, seq, micro)
    args = ModelArgs.from_config(cfg["model"])
    tokens = steps * micro * seq

    # 1. Plain PyTorch: forward, backward, clip, AdamW, scheduler.
    torch.manual_seed(0)
    model = Transformer(args)
    torch_step = make_step(model, cfg)

    plain_s = time_steps(torch_step, data, warmup)

    # 2. sheepop: the same model inside the DeepSpeed engine (world size 1, ZeRO stage 0).
    eng.init_distributed()
    torch.manual_seed(0)
    engine = eng.build(Transformer(args), cfg, world_size=1)

    def ds_step(w):
        with autocast():
            loss = engine(w[:, :-1], w[:, 1:])
        engine.backward(loss)
        engine.step()

    ds_s = time_steps(ds_step, data, warmup)
    eng.shutdown()

    fpt = flops_per_token(args, seq)
    print(f"model={model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"micro batch {micro} × seq {seq}, precision {eng.precision_mode(t['precision'])} (plain PyTorch: "
          f"{'bf16 autocast' if eng.compute_dtype(t['precision']) else 'fp32'}), {steps} timed steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'loop':<28}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}")
    for name, secs in (("plain PyTorch", plain_s), ("sheepop (DeepSpeed engine)", ds_s)):
        print(f"{name:<28}{1000 * secs / steps:>10.0f}{tokens / secs:>12,.0f}{tokens / secs * fpt / 1e9:>10.1f}")
    print(f"ratio sheepop / plain PyTorch tokens/s: {plain_s / ds_s:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
