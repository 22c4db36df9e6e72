"""Peak FLOP/s of the hardware and model FLOPs utilisation (MFU).

MFU = model FLOPs per token × tokens/s ÷ (peak FLOP/s per device × devices). The peak comes
from GPUS, the one table of datasheet numbers for known GPUs (dense, no sparsity; `sheepop plan`
reads its memory sizes too), and on a CPU from a
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the GPU table alone stays light (`sheepop plan`)
    import torch


@dataclass(frozen=True)
class GPU:
    match: str  # substring of torch.cuda.get_device_name() that names this GPU (case-insensitive)
    bf16: float  # bf16/fp16 tensor-core peak, FLOP/s, dense (no sparsity), vendor datasheet
    fp32: float  # plain fp32 (non-TF32: torch leaves TF32 matmuls off by default), FLOP/s
    memory_gib: float | None = None  # what nvidia-smi reports as total; None: `sheepop plan` does not offer it


# The one table of GPUs: `sheepop plan` reads memory and bf16 peak by the short name
# (cluster.gpu), MFU reads the peaks by device name. A device name matches the entry with the
# longest `match` it contains (H100 PCIe before H100, L40S before L40 before L4, GH200 before
# H200); on a tie the earlier entry wins (the two A100s have the same peaks).
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("H100", 989e12, 67e12, 79.6),  # SXM ("NVIDIA H100 80GB HBM3")
    "h100-pcie": GPU("H100 PCIe", 756e12, 51e12, 79.6),
    "h200": GPU("H200", 989e12, 67e12, 140.4),
    "a100-80gb": GPU("A100", 312e12, 19.5e12, 80.0),
    "a100-40gb": GPU("A100", 312e12, 19.5e12, 40.0),
    "l40s": GPU("L40S", 362e12, 91.6e12, 45.0),
    "l4": GPU("L4", 121e12, 30.3e12, 22.5),
    "a10g": GPU("A10G", 70e12, 31.2e12, 22.5),
    "gb200": GPU("GB200", 2.5e15, 80e12),
    "b200": GPU("B200", 2.25e15, 80e12),
    "gh200": GPU("GH200", 989e12, 67e12),
    "h100-nvl": GPU("H100 NVL", 835e12, 60e12),
    "h800": GPU("H800", 989e12, 67e12),
    "a800": GPU("A800", 312e12, 19.5e12),
    "l40": GPU("L40", 181e12, 90.5e12),
    "a10": GPU("A10", 125e12, 31.2e12),
    "rtx-4090": GPU("RTX 4090", 165e12, 82.6e12),
    "rtx-3090": GPU("RTX 3090", 71e12, 35.6e12),
    "v100": GPU("V100", 125e12, 15.7e12),  # no bf16: the number is its fp16 tensor-core rate
    "t4": GPU("T4", 65e12, 8.1e12),
    "mi300x": GPU("MI300X", 1307e12, 163e12),
    "mi250": GPU("MI250", 362e12, 47.9e12),
}
_BY_MATCH = sorted(GPUS.values(), key=lambda g: -len(g.match))  # stable: ties keep table order

PROBE_SIZE = 1024  # matrix side; big enough to reach the BLAS's steady rate, fast enough to time many
PROBE_SECONDS = 1.0  # best of this much timing, per dtype: long enough to catch quiet moments on a busy machine

_memo: dict[tuple, float] = {}


def is_half(precision) -> bool:
    """True for a bf16/fp16 run. Accepts 'bf16', 'torch.bfloat16', a torch.dtype or None (fp32)."""
    return precision is not None and any(s in str(precision) for s in ("bf16", "bfloat16", "fp16", "float16"))


def gpu_for_device(name: str) -> GPU | None:
    """The GPUS entry of a device name as torch reports it ("NVIDIA H100 80GB HBM3"); None if unknown."""
    return next((g for g in _BY_MATCH if g.match.lower() in name.lower()), None)


def gpu_peak(name: str, half: bool) -> float | None:
    gpu = gpu_for_device(name)
    return None if gpu is None else gpu.bf16 if half else gpu.fp32


def cache_path() -> Path:
    base = os.environ.get("SHEEPOP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sheepop"
    return Path(base) / "peak_flops.json"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (taskset, a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@functools.cache  # MFU asks for the CPU's peak every step
def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(dtype: torch.dtype | None = None, size: int = PROBE_SIZE,
                     seconds: float = PROBE_SECONDS) -> float:
    """FLOP/s of square matmuls in `dtype` (default fp32) with this process's torch thread count:
    the best of many timed matmuls, since a peak is what the hardware can do, not what a busy
    machine did."""
    import torch

    dtype = dtype or torch.float32
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


def _cpu_key(half: bool) -> tuple[str, "torch.dtype"]:
    import torch

    dtype = torch.bfloat16 if half else torch.float32
    return f"{cpu_name()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__.split('+')[0]}|probe=2", dtype


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cached: dict) -> None:
    path = cache_path()
    try:  # concurrent ranks may race here: write a temp file and rename (atomic on POSIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home still gets a number, measured once per process


def cpu_peak(half: bool) -> float:
    """Cached measured CPU peak for bf16 (half) or fp32 at the current thread count."""
    key, dtype = _cpu_key(half)
    if key in _memo:
        return _memo[key]
    cached = _read_cache()
    if key not in cached:
        cached[key] = measure_cpu_peak(dtype)
        _write_cache(cached)
    _memo[key] = cached[key]
    return cached[key]


def raise_cpu_peak(half: bool, achieved: float) -> float:
    """A training step beat the cached peak: the probe ran on a busy machine (other processes
    held the cores), so its number was too low and MFU came out above 100% (194% in a demo).
    Probe again, now, and keep the larger of that and what the step achieved (a lower bound of
    the peak), here and in the cache."""
    key, dtype = _cpu_key(half)
    if achieved <= cpu_peak(half):
        return _memo[key]
    cached = _read_cache()
    cached[key] = _memo[key] = max(measure_cpu_peak(dtype), achieved)
    _write_cache(cached)
    return cached[key]


def peak_flops(device: torch.device | str, precision) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from). None when the GPU is unknown."""
    import torch

    half = is_half(precision)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, half)
        return peak, f"{name} datasheet ({'bf16' if half else 'fp32'})" if peak else f"{name}: not in sheepop.perf.GPUS"
    return cpu_peak(half), f"CPU matmul probe ({'bf16' if half else 'fp32'}, {torch.get_num_threads()} threads)"


def mfu(flops_per_token: float, tokens_per_sec: float, peak_per_device: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak."""
    if not peak_per_device or devices < 1:
        return None
    return flops_per_token * tokens_per_sec / (peak_per_device * devices)
