"""Generation speed with and without the KV cache, measured in the same run.

model=small (random init: speed does not depend on the weights; init_std=0.2 so greedy tokens
vary and the two paths' agreement means something), max_seq_len raised to 1024 so the longest
case fits. For each total length (prompt + new tokens) it prints tokens/s of both paths, the
cache's speedup as a ratio, and whether both picked exactly the same greedy tokens.

  .venv/bin/python bench/generate.py [--lengths 64 256 1024] [--new 64] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

from sheepop.config import compose
from sheepop.model.generate import generate
from sheepop.model.transformer import Transformer


def timed(model, prompt, new, use_cache):
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, [prompt], new, use_cache=use_cache)
    if cuda:
        torch.cuda.synchronize()
    return out[0], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--new", type=int, default=64, help="new tokens per case (half the length when shorter)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    cfg = compose(["model=small", f"model.max_seq_len={max(a.lengths)}", "model.init_std=0.2"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(a.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model=small ({n_params / 1e6:.1f}M params), fp32, batch 1, {a.device}, "
          f"{torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(1)
    timed(model, [1, 2, 3], 4, True), timed(model, [1, 2, 3], 4, False)  # warm-up
    print(f"{'total':>6}{'prompt':>8}{'new':>6}{'cached tok/s':>14}{'uncached tok/s':>16}{'speedup':>9}  same tokens")
    for total in a.lengths:
        new = min(a.new, total // 2)
        prompt = torch.randint(0, cfg.model.vocab_size, (total - new,), generator=gen).tolist()
        cached, t_c = timed(model, prompt, new, True)
        uncached, t_u = timed(model, prompt, new, False)
        print(f"{total:>6}{total - new:>8}{new:>6}{new / t_c:>14.1f}{new / t_u:>16.1f}{t_u / t_c:>8.1f}x  "
              f"{'yes' if cached == uncached else 'NO'} ({len(set(cached))} distinct)")


if __name__ == "__main__":
    main()
