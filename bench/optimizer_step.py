"""AdamW step time on this machine: torch's implementations (for-loop, foreach, fused) side by side.

The optimizer step is the part of a training step that touches every parameter three times
(weights, two moments) with no matmul: on a CPU it is memory-bound and its implementation
matters. Times `torch.optim.AdamW` over the parameters of one model preset (fp32, as DeepSpeed's
master copy is), each implementation in turn, rounds interleaved so a busy machine hurts all alike.

    python bench/optimizer_step.py [model=small] [steps=20] [rounds=3] [device=cpu]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sheepop.cli.args import bench_options  # noqa: E402
from sheepop.config import compose  # noqa: E402
from sheepop.model.transformer import Transformer  # noqa: E402

IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv) -> int:
    o = bench_options(argv, {"model": str, "steps": int, "rounds": int, "device": str}, "bench/optimizer_step.py")
    model_name, steps, rounds = o.get("model", "small"), o.get("steps", 20), o.get("rounds", 3)
    device = torch.device(o.get("device", "cpu"))
    cfg = compose([f"model={model_name}", "cluster=process"])
    torch.manual_seed(0)
    params = [p.detach().to(device) for p in Transformer(cfg.model).parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    opts = {}
    for name, kwargs in IMPLEMENTATIONS.items():
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opts[name] = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, **kwargs)
        opts[name].step()  # state allocated outside the timing
    for _ in range(rounds):
        for name, opt in opts.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / steps)
    n = sum(p.numel() for p in params)
    base = statistics.median(times["for-loop"])
    print(f"AdamW over model={model_name}'s {n / 1e6:.1f}M parameters ({len(params)} tensors), fp32, {device}, "
          f"{torch.get_num_threads()} threads; median of {rounds} rounds of {steps} steps")
    print(f"{'implementation':<16}{'ms/step':>10}{'vs for-loop':>13}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<16}{m * 1e3:>10.2f}{base / m:>12.2f}×")
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(opts["fused"].param_groups[0]["params"],
                                                                         opts["for-loop"].param_groups[0]["params"]))
    print(f"fused and for-loop weights agree after {1 + rounds * steps} steps: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
