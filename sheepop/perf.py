"""Peak FLOP/s of the hardware and model FLOPs utilisation (MFU).

MFU = model FLOPs per token × tokens/s ÷ (peak FLOP/s per device × devices). The peak comes
from a table of datasheet numbers for known GPUs (dense, no sparsity), and on a CPU from a
short matmul probe, measured once per (CPU, threads, dtype, torch version) and cached in
$SHEEPOP_CACHE_DIR (default ~/.cache/sheepop/peak_flops.json), because no table can know what
a given CPU does with a given thread count.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

# Substring of torch.cuda.get_device_name() → (bf16/fp16 tensor-core peak, fp32 peak), FLOP/s,
# dense. First match wins, so longer names come before their prefixes (L40S before L4).
# fp32 is the plain (non-TF32) rate: torch leaves TF32 matmuls off by default.
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("GB200", 2.5e15, 80e12),
    ("B200", 2.25e15, 80e12),
    ("H200", 989e12, 67e12),
    ("GH200", 989e12, 67e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("A800", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 30.3e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),  # no bf16: the number is its fp16 tensor-core rate
    ("T4", 65e12, 8.1e12),
    ("MI300X", 1307e12, 163e12),
    ("MI250", 362e12, 47.9e12),
]

PROBE_SIZE = 1024  # matrix side; big enough to reach the BLAS's steady rate, fast enough to time many
PROBE_SECONDS = 1.0  # best of this much timing, per dtype: long enough to catch quiet moments on a busy machine

_memo: dict[tuple, float] = {}


def is_half(precision) -> bool:
    """True for a bf16/fp16 run. Accepts 'bf16', 'torch.bfloat16', a torch.dtype or None (fp32)."""
    return precision is not None and any(s in str(precision) for s in ("bf16", "bfloat16", "fp16", "float16"))


def gpu_peak(name: str, half: bool) -> float | None:
    for key, bf16, fp32 in GPU_PEAKS:
        if key.lower() in name.lower():
            return bf16 if half else fp32
    return None


def cache_path() -> Path:
    base = os.environ.get("SHEEPOP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sheepop"
    return Path(base) / "peak_flops.json"


@functools.cache  # MFU asks for the CPU's peak every step
def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(dtype: torch.dtype = torch.float32, size: int = PROBE_SIZE,
                     seconds: float = PROBE_SECONDS) -> float:
    """FLOP/s of square matmuls in `dtype` with this process's torch thread count: the best of
    many timed matmuls, since a peak is what the hardware can do, not what a busy machine did."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):  # warm-up: thread pool start, BLAS kernel selection
        a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def cpu_peak(half: bool, *, refresh: bool = False) -> float:
    """Cached measured CPU peak for bf16 (half) or fp32 at the current thread count."""
    dtype = torch.bfloat16 if half else torch.float32
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__.split('+')[0]}|probe=2"
    if not refresh and key in _memo:
        return _memo[key]
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if refresh or key not in cached:
        cached[key] = measure_cpu_peak(dtype)
        try:  # concurrent ranks may race here: write a temp file and rename (atomic on POSIX)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home still gets a number, measured once per process
    _memo[key] = cached[key]
    return cached[key]


def peak_flops(device: torch.device | str, precision) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from). None when the GPU is unknown."""
    half = is_half(precision)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, half)
        return peak, f"{name} datasheet ({'bf16' if half else 'fp32'})" if peak else f"{name}: not in sheepop.perf.GPU_PEAKS"
    return cpu_peak(half), f"CPU matmul probe ({'bf16' if half else 'fp32'}, {torch.get_num_threads()} threads)"


def mfu(flops_per_token: float, tokens_per_sec: float, peak_per_device: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak."""
    if not peak_per_device or devices < 1:
        return None
    return flops_per_token * tokens_per_sec / (peak_per_device * devices)
