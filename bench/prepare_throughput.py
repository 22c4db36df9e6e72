"""Data preparation throughput: the whole curation pipeline and tokenization alone, on 1 worker
(in-process) and on 2 Ray Data workers, same corpus, same run; then tokens/s of tokenization
next to tokens/s of training model=small on this machine (plain PyTorch forward/backward/step,
the trainer's precision), to show whether tokenization could hold training back.

The corpus: the Python standard library (~31 MB of .py) plus the venv's site-packages .py,
cut at `mb` megabytes (default 60; the issue asks for >= 50).

  python bench/prepare_throughput.py [mb=60] [workers=2] [train_steps=6] [micro=8]
"""
from __future__ import annotations

import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from plain_torch import make_step, windows
from sheepop.cli.args import bench_options
from sheepop.config import compose
from sheepop.data.shards import prepare
from sheepop.model.transformer import Transformer
from sheepop.train import engine as eng


def prepare_run(out: Path, mb: int, workers: int) -> tuple[dict, float]:
    paths = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    cfg = compose(["model=small", "data=files", f"data.paths=[{','.join(paths)}]", "data.extensions=[.py]",
                   f"data.max_bytes={mb * 1_000_000}", f"data.out_dir={out}", f"data.num_workers={workers}",
                   "cluster=process"])
    t0 = time.perf_counter()
    m = prepare(cfg, log=lambda *_: None, progress=False)
    return m, time.perf_counter() - t0


def train_tokens_per_s(steps: int, micro: int) -> tuple[float, str]:
    cfg = compose(["model=small"])
    seq = cfg.model.max_seq_len
    torch.manual_seed(0)
    step = make_step(Transformer(cfg.model), cfg)  # plain PyTorch: bf16 through autocast
    amp = eng.compute_dtype(cfg.trainer.precision)
    data = windows(cfg, steps + 1, micro, seq)

    step(data[0])  # warm-up
    t0 = time.perf_counter()
    for w in data[1:]:
        step(w)
    return steps * micro * seq / (time.perf_counter() - t0), "bf16" if amp else "fp32"


def main(argv):
    o = bench_options(argv, {"mb": int, "workers": int, "train_steps": int, "micro": int}, "bench/prepare_throughput.py")
    mb, workers = o.get("mb", 60), o.get("workers", 2)
    tmp = Path(tempfile.mkdtemp(prefix="sheepop-prep-bench-"))
    try:
        rows = []
        for n in (1, workers):
            m, wall = prepare_run(tmp / f"w{n}", mb, n)
            read = m["funnel"][0]["bytes_out"]
            tok_s = m["stage_seconds"]["tokenize"]
            rows.append({"workers": n, "wall": wall, "read_mb": read / 1e6, "kept_mb": m["bytes"] / 1e6,
                         "tokens": m["tokens"], "pipe_mbs": read / 1e6 / wall, "tok_mbs": m["bytes"] / 1e6 / tok_s,
                         "tok_tps": m["tokens"] / tok_s, "stages": m["stage_seconds"], "manifest": m})
        same = all(a["sha256"] == b["sha256"] for sp in ("train", "val")
                   for a, b in zip(rows[0]["manifest"]["splits"][sp]["shards"], rows[1]["manifest"]["splits"][sp]["shards"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    train_tps, prec = train_tokens_per_s(o.get("train_steps", 6), o.get("micro", 8))

    base = rows[0]
    print(f"corpus: stdlib + site-packages .py, {base['read_mb']:.1f} MB read, {base['kept_mb']:.1f} MB kept after "
          f"curation, {base['tokens']:,} tokens (vocab 8192)")
    print(f"{'workers':>7} {'wall s':>7} {'pipeline MB/s':>14} {'tokenize MB/s':>14} {'tokenize tok/s':>15} "
          f"{'vs 1 worker':>12}   stage seconds")
    for r in rows:
        print(f"{r['workers']:>7} {r['wall']:>7.1f} {r['pipe_mbs']:>14.2f} {r['tok_mbs']:>14.2f} {r['tok_tps']:>15,.0f} "
              f"{base['wall'] / r['wall']:>11.2f}x   {r['stages']}")
    print(f"shards byte-identical between 1 and {workers} workers: {same}")
    print(f"training model=small ({prec}, micro-batch {o.get('micro', 8)} x 256, 1 process): {train_tps:,.0f} tokens/s; "
          f"tokenization on 1 worker is {base['tok_tps'] / train_tps:,.0f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
