"""Training-step throughput: sheepop's DeepSpeed engine vs a plain PyTorch loop, same run.

Both time the same model (default model=small), batch, precision and optimizer settings on
this machine; the ratio shows what the engine costs at world size 1. The plain loop runs twice:
with torch's default AdamW and with its fused one (what sheepop uses, trainer.fused_optimizer).
compile=true adds sheepop with trainer.compile=true (torch.compile per block), its steady-state
ratio and, apart, its compile time (its warm-up steps' time less as many steady steps).
paths=true also times the whole `sheepop train` path a user runs (data loading, the loop's
bookkeeping, metrics lines) with cluster=process and with cluster=local (one Ray worker): the
steady-state tokens/s of its metrics.jsonl (step_time, logged every step) for the same batch,
each round beside a fresh round of the plain loop, which is what the paths' ratio compares with.

threads=N: N compute threads everywhere (default: one per core), e.g. threads=1 on two cores leaves
one core to everything else on the machine (Ray's own processes, with cluster=local).

  python bench/train_throughput.py [model=small] [steps=20] [warmup=3] [micro=16] [precision=auto] [compile=false] [paths=false] [rounds=3] [threads=0]
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
from contextlib import nullcontext

from sheepop.cpu_allocator import heap_only, hugepages_on, keep_freed_memory, rerun_with_training_malloc

rerun_with_training_malloc()  # the plain loops get the malloc `sheepop train` runs with (sheepop.cpu_allocator)
keep_freed_memory()

import torch  # noqa: E402

from plain_torch import make_step, windows  # noqa: E402
from sheepop.cli.args import bench_options  # noqa: E402
from sheepop.config import batch_plan, compose  # noqa: E402
from sheepop.model.transformer import Transformer, flops_per_token  # noqa: E402
from sheepop.train import engine as eng  # noqa: E402


def _timed(step_fn, data) -> float:
    t0 = time.perf_counter()
    for w in data:
        step_fn(w)
    return time.perf_counter() - t0


def time_warmup_and_steps(step_fn, data, warmup) -> tuple[float, float]:
    """(seconds of the warm-up steps, seconds of the timed ones)."""
    return _timed(step_fn, data[:warmup]), _timed(step_fn, data[warmup:])


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this process's world of one


def sheepop_train_seconds(kind: str, model: str, micro: int, precision: str, steps: int, warmup: int,
                          tokens_per_step: int, threads: int = 0) -> float:
    """Seconds `sheepop train cluster=KIND` spent on `steps` steady steps (after `warmup`), from its
    metrics.jsonl: the same batch as the benches above (accumulation 1), random init, no saves."""
    root = Path(__file__).resolve().parent.parent
    run = Path(tempfile.mkdtemp(prefix=f"bench-path-{kind}-"))
    data = Path(os.environ.get("SHEEPOP_BENCH_DATA", "/tmp/sheepop-bench/data/stdlib-3mb"))
    r = subprocess.run([sys.executable, "-m", "sheepop.cli", "train", f"model={model}", f"cluster={kind}",
                        "parallelism=ddp", "trainer.global_batch_size=0", f"trainer.micro_batch_size={micro}",
                        f"trainer.precision={precision}", f"trainer.max_steps={steps + warmup}", "trainer.eval_every=0",
                        "trainer.save_every=0", "trainer.eval_batches=1", "trainer.progress=false", "logger=none",
                        f"run.dir={run}", "data.max_bytes=3000000", f"data.out_dir={data}-v{model}",
                        *([f"cluster.cpus_per_worker={threads}"] if threads and kind == "local" else [])],
                       cwd=root, capture_output=True, text=True, env={
                           **{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "WANDB_MODE": "disabled",
                           **({"OMP_NUM_THREADS": str(threads)} if threads and kind == "process" else {})})
    if r.returncode != 0:
        raise SystemExit(f"sheepop train cluster={kind} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [row["step_time"] for row in rows if "step_time" in row and "event" not in row and row["step"] > warmup]
    assert len(times) == steps and all(row.get("tokens_per_sec", 0) > 0 for row in rows if "step_time" in row)
    assert tokens_per_step == next(e for e in rows if e.get("event") == "start")["tokens_per_step"]
    return sum(times)


def main(argv):
    o = bench_options(argv, {"model": str, "steps": int, "warmup": int, "micro": int, "precision": str, "compile": str,
                        "paths": str, "rounds": int, "threads": int}, "bench/train_throughput.py")
    threads = o.get("threads", 0)
    if threads:
        torch.set_num_threads(threads)
    with_compile = o.get("compile", "false").lower() == "true"
    with_paths = o.get("paths", "false").lower() == "true"
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

    # 1. Plain PyTorch: forward, backward, clip, AdamW (torch's default, and fused), scheduler.
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    torch_step = make_step(model, cfg)
    torch.manual_seed(0)
    fused_step = make_step(Transformer(cfg.model), cfg, fused=True)

    # 2. sheepop: the same model inside the DeepSpeed engine (world size 1, ZeRO stage 0).
    eng.init_distributed()
    torch.manual_seed(0)
    engine = eng.build(Transformer(cfg.model), cfg, batch)

    def ds_step(w):
        with autocast():
            loss = engine(w[:, :-1], w[:, 1:])
        engine.backward(loss)
        engine.step()

    # Rounds interleaved, in a rotating order: a machine that slows down for a while (another
    # tenant, the clock) costs every loop alike, and the median round is reported.
    loops = {"plain PyTorch": torch_step, "plain PyTorch, fused AdamW": fused_step, "sheepop (DeepSpeed engine)": ds_step}
    for fn in loops.values():
        for w in data[:warmup]:
            fn(w)
    rounds = {name: [] for name in loops}
    for r in range(o.get("rounds", 3)):
        names = list(loops)[r % len(loops):] + list(loops)[:r % len(loops)]
        for name in names:
            rounds[name].append(_timed(loops[name], data[warmup:]))
    plain_s, fused_s, ds_s = (statistics.median(rounds[name]) for name in loops)
    rows = [(name, statistics.median(ts)) for name, ts in rounds.items()]

    # 3. sheepop with trainer.compile=true: the same engine, each block torch.compile'd.
    if with_compile:
        import dataclasses

        ccfg = dataclasses.replace(cfg, trainer=dataclasses.replace(t, compile="true"),
                                   run=dataclasses.replace(cfg.run, dir=tempfile.mkdtemp(prefix="bench-compile-")))
        torch.manual_seed(0)
        engine = eng.build(Transformer(ccfg.model), ccfg, batch)  # a fresh cache folder: a cold compile
        warm_s, compiled_s = time_warmup_and_steps(ds_step, data, warmup)
        compile_s = warm_s - warmup * compiled_s / steps
        rows.append(("sheepop, trainer.compile=true", compiled_s))
    eng.shutdown()
    paths = {}
    if with_paths:  # the whole `sheepop train` step path, in its own processes (after this one's engine is gone)
        # One run of each path is one sample of a noisy machine (±10% between runs here): each round
        # times plain PyTorch again right beside the two runs, and the paths are compared with that.
        paths = {"plain PyTorch (beside the paths)": [], "sheepop train cluster=process": [],
                 "sheepop train cluster=local": []}
        for _ in range(o.get("rounds", 3)):
            paths["plain PyTorch (beside the paths)"].append(_timed(torch_step, data[warmup:]))
            for kind in ("process", "local"):
                paths[f"sheepop train cluster={kind}"].append(
                    sheepop_train_seconds(kind, model_name, micro, t.precision, steps, warmup, micro * seq, threads))
        paths = {name: statistics.median(ts) for name, ts in paths.items()}

    fpt = flops_per_token(cfg.model, seq)
    print(f"model={model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"median of {o.get('rounds', 3)} interleaved rounds for the first three loops, "
          f"micro batch {micro} × seq {seq}, precision {eng.precision_mode(t.precision)} (plain PyTorch: "
          f"{'bf16 autocast' if eng.compute_dtype(t.precision) else 'fp32'}), {steps} timed steps, "
          f"{torch.get_num_threads()} threads, malloc: heap only {'yes' if heap_only() else 'no'}, "
          f"huge pages {'yes' if hugepages_on() else 'no'}")
    print(f"{'loop':<32}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'vs plain':>10}{'vs fused':>10}")
    for name, secs in rows:
        print(f"{name:<32}{1000 * secs / steps:>10.0f}{tokens / secs:>12,.0f}{tokens / secs * fpt / 1e9:>10.1f}"
              f"{plain_s / secs:>10.3f}{fused_s / secs:>10.3f}")
    print(f"ratio sheepop / plain PyTorch tokens/s: {plain_s / ds_s:.3f} (plain with fused AdamW: {fused_s / ds_s:.3f})")
    if paths:
        beside = paths["plain PyTorch (beside the paths)"]
        print(f"whole step path: median of {o.get('rounds', 3)} rounds, each a plain PyTorch loop and a run of each path")
        print(f"{'path':<32}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'vs plain':>10}")
        for name, secs in paths.items():
            print(f"{name:<32}{1000 * secs / steps:>10.0f}{tokens / secs:>12,.0f}{tokens / secs * fpt / 1e9:>10.1f}"
                  f"{beside / secs:>10.3f}")
    if with_compile:
        print(f"ratio sheepop compiled / plain PyTorch (eager) tokens/s: {plain_s / compiled_s:.3f}; "
              f"compiled / sheepop eager: {ds_s / compiled_s:.3f}")
        saved = (ds_s - compiled_s) / steps
        print(f"compile time (cold cache): {compile_s:.1f} s" + (
            f"; pays back after {compile_s / saved:,.0f} steps" if saved > 0 else "; never pays back here"))


if __name__ == "__main__":
    main(sys.argv[1:])
