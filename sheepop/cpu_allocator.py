"""glibc's malloc on transparent huge pages for `sheepop train` (Linux; matters for CPU training).

A CPU training step allocates and frees hundreds of MB of activations: `model=small`, micro 8
takes ~99k page faults a step (~390 MB of fresh pages). glibc serves every block over its
largest mmap threshold (32 MB) with a fresh mmap(), and the kernel faults in and zeroes those
pages 4 kB at a time, on every step: ~17% of the process's CPU time was spent in the kernel.
With glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35), malloc asks for transparent huge
pages (madvise), 2 MB per fault: ~2-4k faults a step, and the step 8-20% faster
(`bench/malloc_hugepages.py`).

Tunables are read when a process starts, so `sheepop train` runs itself again once, at its
first line, with the tunable added; everything it starts (DeepSpeed, the local Ray and its
workers) inherits it. A GLIBC_TUNABLES that already names glibc.malloc.hugetlb (any value, 0
to turn this off) is left as it is.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # "always [madvise] never"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, macOS)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise, never), None where unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def tunables_with_hugepages(tunables: str, glibc: tuple[int, int] | None, thp: str | None) -> str | None:
    """The GLIBC_TUNABLES value to run with, or None when nothing is to change: the tunable is
    set already (the user's choice), this glibc has no such tunable, or the kernel gives no
    transparent huge pages."""
    if TUNABLE in tunables or glibc is None or glibc < (2, 35) or thp not in ("always", "madvise"):
        return None
    return f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"


def hugepages_on() -> bool:
    """Whether this process's malloc was started with huge pages (the `start` event records it)."""
    return f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


def rerun_with_hugepages() -> None:
    """Replace this process (same pid, arguments and interpreter flags) with one whose malloc
    uses huge pages; returns only when there is nothing to change."""
    value = tunables_with_hugepages(os.environ.get("GLIBC_TUNABLES", ""), glibc_version(), thp_mode())
    if value is None or sys.platform != "linux":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": value})
    except OSError:  # an interpreter that cannot be run again (a frozen app, a removed venv): train as it is
        return
