"""`sheepop train` on 2 Ray workers (ZeRO-2) vs a plain torchrun + DDP loop of the same model and
batch, measured in the same run. Prints steady-state tokens/s (median over steps after warm-up)
for both, the ratio, and each side's wall time including start-up.

  python bench/distributed_overhead.py [model=small] [steps=20] [micro=8] [workers=2] [precision=auto]
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
WARMUP = 3

from sheepop.cpu_allocator import keep_freed_memory, rerun_with_training_malloc  # noqa: E402

# torchrun's ranks inherit the malloc that `sheepop train` runs with (sheepop.cpu_allocator)
rerun_with_training_malloc()


def ddp_worker(model_name: str, steps: int, micro: int, precision: str, out: str) -> None:
    """The baseline: what a person would write by hand with torchrun and DDP (gloo, CPU)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from plain_torch import make_step, windows
    from sheepop.config import compose
    from sheepop.model.transformer import Transformer

    keep_freed_memory()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = compose([f"model={model_name}", f"trainer.micro_batch_size={micro}", f"trainer.max_steps={steps}",
                   f"trainer.precision={precision}"])
    seq = cfg.model.max_seq_len
    torch.manual_seed(0)
    model = DDP(Transformer(cfg.model))
    step = make_step(model, cfg, fused=True)  # the optimizer sheepop uses: the bench measures distribution
    times = []
    for w in windows(cfg, steps, micro, seq, seed=rank):
        t0 = time.perf_counter()
        dist.all_reduce(step(w))  # the loss a person would log
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"tokens_per_step": micro * seq * world, "times": times}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    from sheepop.cli.args import bench_options
    from sheepop.net import free_port

    o = bench_options(argv, {"model": str, "steps": int, "micro": int, "workers": int, "precision": str}, "bench/distributed_overhead.py")
    model, steps, micro = o.get("model", "small"), o.get("steps", 20), o.get("micro", 8)
    world, precision = o.get("workers", 2), o.get("precision", "auto")
    if steps < WARMUP + 2:  # the last step's metrics row carries the final eval: not a training-speed sample
        raise SystemExit(f"steps={steps}: need at least {WARMUP + 2} ({WARMUP} warm-up steps, then timed ones)")
    tmp = Path(tempfile.mkdtemp(prefix="sheepop-bench-"))
    threads = str(max(1, (os.cpu_count() or 1) // world))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore::FutureWarning",
           "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    t0 = time.time()
    port = free_port()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
                    f"--master_port={port}", __file__, "--ddp-worker", model, str(steps), str(micro), precision,
                    str(tmp / "ddp.json")], check=True, env=env, cwd=ROOT)
    ddp_wall = time.time() - t0
    ddp = json.loads((tmp / "ddp.json").read_text())
    ddp_tps = ddp["tokens_per_step"] / statistics.median(ddp["times"][WARMUP:])

    t0 = time.time()
    run = tmp / "sheepop"
    subprocess.run([sys.executable, "-m", "sheepop.cli", "train", f"model={model}", "cluster=local",
                    f"cluster.num_workers={world}", "parallelism=zero2", f"trainer.max_steps={steps}",
                    f"trainer.micro_batch_size={micro}", f"trainer.precision={precision}", "trainer.eval_every=0",
                    "trainer.save_every=0", "trainer.progress=false", "logger=none", f"run.dir={run}"],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    sheepop_wall = time.time() - t0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r and r["step"] > WARMUP and "val_loss" not in r]
    sheepop_tps = statistics.median(tps)

    print(f"model={model}, {world} workers × micro batch {micro}, {steps} steps (median after {WARMUP} warm-up), "
          f"precision={precision}, OMP_NUM_THREADS={threads}")
    print(f"{'setup':<44}{'tokens/s':>10}{'wall s':>9}")
    print(f"{'torchrun + DDP (gloo), plain loop':<44}{ddp_tps:>10,.0f}{ddp_wall:>9.1f}")
    print(f"{'sheepop train, Ray Train + DeepSpeed ZeRO-2':<44}{sheepop_tps:>10,.0f}{sheepop_wall:>9.1f}")
    print(f"ratio sheepop / DDP tokens/s: {sheepop_tps / ddp_tps:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ddp-worker":
        ddp_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        main(sys.argv[1:])
