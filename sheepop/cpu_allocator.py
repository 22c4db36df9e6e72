"""glibc's malloc for `sheepop train`: memory kept for the next step, on huge pages (Linux; matters
for CPU training).

A CPU training step allocates and frees hundreds of MB of activations: `model=small`, micro 8
takes ~99k page faults a step (~390 MB of fresh pages). glibc serves every block over its mmap
threshold (at most 32 MB) with a fresh mmap() and unmaps it on free, so the kernel faults in and
zeroes those pages again on every step: ~17% of the process's CPU time was spent in the kernel.
`sheepop train` adds to GLIBC_TUNABLES:
  - glibc.malloc.mmap_max=0, glibc.malloc.trim_threshold=4 GiB and glibc.malloc.top_pad=64 MiB:
    every block comes from the heap, and what a step frees stays there for the next one (the
    process keeps its peak: ~6% more resident memory for `model=small`). A thread other than the
    main one (a Ray Train worker's training thread) allocates from a per-thread arena, which grows
    in heaps of at most 64 MB and unmaps a heap once it is empty unless top_pad is a heap's worth
    (trim_threshold does not count there): without top_pad a Ray worker mapped and unmapped a
    heap every step. A block over 64 MB is still a fresh mmap() on such a thread (glibc has no
    tunable for it), which is why the model's loss works on chunks of logits
    (sheepop.model.transformer.chunked_cross_entropy). `bench/malloc_settings.py` measures it.
  - glibc.malloc.hugetlb=1 (glibc >= 2.35, a kernel with transparent huge pages): what malloc
    maps is madvised for 2 MB pages, 2 MB per fault where memory is still mapped fresh.
Tunables are read when a process starts, so `sheepop train` runs itself again once, at its
first line, with them added; everything it starts (DeepSpeed, the local Ray and its workers)
inherits them. A GLIBC_TUNABLES that names any of them (or glibc.malloc.mmap_threshold) is the
user's malloc setting and is left as it is: e.g. glibc.malloc.hugetlb=0 for glibc's defaults.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
# Every block from the heap, and freed memory kept there (glibc >= 2.26 reads these as tunables).
HEAP_ONLY = ("glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={4 << 30}", f"glibc.malloc.top_pad={64 << 20}")
# A GLIBC_TUNABLES naming one of these sets malloc up itself: sheepop adds nothing.
USER_MALLOC = (TUNABLE, "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold",
               "glibc.malloc.top_pad")
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


def training_tunables(tunables: str, glibc: tuple[int, int] | None, thp: str | None) -> str | None:
    """The GLIBC_TUNABLES value to run with, or None when nothing is to change: the user's value
    names a malloc setting of its own, or the C library is not glibc >= 2.26. Huge pages only
    where this glibc (>= 2.35) and the kernel have them."""
    named = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    if named & set(USER_MALLOC) or glibc is None or glibc < (2, 26):
        return None
    added = [*HEAP_ONLY, *([f"{TUNABLE}=1"] if glibc >= (2, 35) and thp in ("always", "madvise") else [])]
    return ":".join([tunables, *added] if tunables else added)


def hugepages_on() -> bool:
    """Whether this process's malloc was started with huge pages (the `start` event records it)."""
    return f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


def heap_only() -> bool:
    """Whether this process's malloc was started with every block from the heap (HEAP_ONLY)."""
    return HEAP_ONLY[0] in os.environ.get("GLIBC_TUNABLES", "").split(":")


def rerun_with_training_malloc() -> None:
    """Replace this process (same pid, arguments and interpreter flags) with one whose malloc
    runs with training_tunables; returns only when there is nothing to change."""
    value = training_tunables(os.environ.get("GLIBC_TUNABLES", ""), glibc_version(), thp_mode())
    if value is None or sys.platform != "linux":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": value})
    except OSError:  # an interpreter that cannot be run again (a frozen app, a removed venv): train as it is
        return
