"""Training-step throughput: sheepop's DeepSpeed engine vs a plain PyTorch loop, same run.

Both time the same model (default model=small), batch, precision and optimizer settings on
this machine; the ratio shows what the engine costs at world size 1. compile=true adds sheepop
with trainer.compile=true (torch.compile per block), its steady-state ratio and, apart, its
compile time (its warm-up steps' time less as many steady steps).

  python bench/train_throughput.py [model=small] [steps=20] [warmup=3] [micro=16] [precision=auto] [compile=false]
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch

from plain_torch import make_step, windows
from sheepop.cli.args import parse_kv
from sheepop.config import batch_plan, compose
from sheepop.model.transformer import Transformer, flops_per_token
from sheepop.train import engine as eng


def time_steps(step_fn, data, warmup) -> float:
    return time_warmup_and_steps(step_fn, data, warmup)[1]


def time_warmup_and_steps(step_fn, data, warmup) -> tuple[float, float]:
    """(seconds of the warm-up steps, seconds of the timed ones)."""
    t0 = time.perf_counter()
    for w in data[:warmup]:
        step_fn(w)
    t1 = time.perf_counter()
    for w in data[warmup:]:
        step_fn(w)
    return t1 - t0, time.perf_counter() - t1


def main(argv):
    o = parse_kv(argv, {"model": str, "steps": int, "warmup": int, "micro": int, "precision": str, "compile": str},
                 "bench")
    with_compile = o.get("compile", "false").lower() == "true"
    model_name, steps, warmup = o.get("model", "small"), o.get("steps", 20), o.get("warmup", 3)
    # global_batch_size=0: accumulation 1, so the engine takes an optimizer step per micro batch like the plain loop
    cfg = compose([f"model={model_name}", "cluster=process", "parallelism=ddp", "trainer.global_batch_size=0",
                   f"trainer.micro_batch_size={o.get('micro', 16)}", f"trainer.precision={o.get('precision', 'auto')}"])
    t = cfg.trainer
    batch = batch_plan(cfg, 1)
    seq, micro = batch.seq_len, batch.micro_batch_size
    amp = eng.autocast_dtype(t.precision)
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp else nullcontext
    data = windows(cfg, steps + warmup, micro, seq)
    tokens = steps * micro * seq

    # 1. Plain PyTorch: forward, backward, clip, AdamW, scheduler.
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    torch_step = make_step(model, cfg)

    plain_s = time_steps(torch_step, data, warmup)

    # 2. sheepop: the same model inside the DeepSpeed engine (world size 1, ZeRO stage 0).
    eng.init_distributed()
    torch.manual_seed(0)
    engine = eng.build(Transformer(cfg.model), cfg, batch)

    def ds_step(w):
        with autocast():
            loss = engine(w[:, :-1], w[:, 1:])
        engine.backward(loss)
        engine.step()

    ds_s = time_steps(ds_step, data, warmup)
    rows = [("plain PyTorch", plain_s), ("sheepop (DeepSpeed engine)", ds_s)]

    # 3. sheepop with trainer.compile=true: the same engine, each block torch.compile'd.
    if with_compile:
        import dataclasses
        import tempfile

        ccfg = dataclasses.replace(cfg, trainer=dataclasses.replace(t, compile="true"),
                                   run=dataclasses.replace(cfg.run, dir=tempfile.mkdtemp(prefix="bench-compile-")))
        torch.manual_seed(0)
        engine = eng.build(Transformer(ccfg.model), ccfg, batch)  # a fresh cache folder: a cold compile
        warm_s, compiled_s = time_warmup_and_steps(ds_step, data, warmup)
        compile_s = warm_s - warmup * compiled_s / steps
        rows.append(("sheepop, trainer.compile=true", compiled_s))
    eng.shutdown()

    fpt = flops_per_token(cfg.model, seq)
    print(f"model={model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"micro batch {micro} × seq {seq}, precision {eng.precision_mode(t.precision)} (plain PyTorch: "
          f"{'bf16 autocast' if eng.compute_dtype(t.precision) else 'fp32'}), {steps} timed steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'loop':<30}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}")
    for name, secs in rows:
        print(f"{name:<30}{1000 * secs / steps:>10.0f}{tokens / secs:>12,.0f}{tokens / secs * fpt / 1e9:>10.1f}")
    print(f"ratio sheepop / plain PyTorch tokens/s: {plain_s / ds_s:.3f}")
    if with_compile:
        print(f"ratio sheepop compiled / plain PyTorch (eager) tokens/s: {plain_s / compiled_s:.3f}; "
              f"compiled / sheepop eager: {ds_s / compiled_s:.3f}")
        saved = (ds_s - compiled_s) / steps
        print(f"compile time (cold cache): {compile_s:.1f} s" + (
            f"; pays back after {compile_s / saved:,.0f} steps" if saved > 0 else "; never pays back here"))


if __name__ == "__main__":
    main(sys.argv[1:])
