"""glibc's malloc for `sheepop train`: memory kept for the next step, on huge pages (Linux; matters
for CPU training).

A CPU training step allocates and frees hundreds of MB of activations: `model=small`, micro 8
takes ~99k page faults a step (~390 MB of fresh pages). glibc serves every block over its mmap
threshold (at most 32 MB) with a fresh mmap() and unmaps it on free, so the kernel faults in and
zeroes those pages again on every step: ~17% of the process's CPU time was spent in the kernel.
Two settings, each where it pays:
  - keep_freed_memory(), called by `sheepop train`'s own process at its start (with cluster=process
    it trains there), by each training process (sheepop.train.loop: a Ray worker) and by the
    benches' plain loops: mallopt() with no mmap, a trim threshold of 2 GiB and a top pad of 64 MiB, so every
    block comes from the heap and what a step frees stays there for the next one (the process keeps
    its peak). A thread other than the main one (a Ray Train worker's training thread) allocates
    from a per-thread arena, which grows in heaps of at most 64 MB and unmaps a heap once it is
    empty unless the top pad is a heap's worth (the trim threshold does not count there). A block
    over 64 MB is still a fresh mmap() on such a thread (glibc has no setting for it), which is why
    the model's loss works on chunks of logits (sheepop.model.transformer.chunked_cross_entropy).
    Only those processes: as glibc tunables, inherited by everything `sheepop train` starts (a
    local Ray's helpers, Ray Data's workers), the same settings cost a `cluster=local` run of
    `model=small` ~200-230 MB more memory (PSS) for no speed (bench/malloc_settings.py).
  - glibc.malloc.hugetlb=1 (glibc >= 2.35, a kernel with transparent huge pages): what malloc
    maps is madvised for 2 MB pages. A tunable is read when a process starts, so `sheepop train`
    runs itself again once, at its first line, with it added (rerun_with_training_malloc).
The decision is made there, once: SHEEPOP_MALLOC=keep-freed (sheepop's settings) or glibc (left as
it is), which every process of the run inherits or is forwarded (sheepop.driver.worker_env). A
GLIBC_TUNABLES that names a malloc setting (USER_MALLOC) is the user's own and gets neither: e.g.
glibc.malloc.hugetlb=0 for glibc's defaults. `bench/malloc_settings.py` measures it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
# A GLIBC_TUNABLES naming one of these sets malloc up itself: sheepop adds nothing.
USER_MALLOC = (TUNABLE, "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold",
               "glibc.malloc.top_pad")
DECISION = "SHEEPOP_MALLOC"  # keep-freed | glibc: decided once per run (rerun_with_training_malloc)
# mallopt's parameters (malloc.h): every block from the heap, freed memory kept there. mallopt takes an
# int, so the trim threshold is 2 GiB less a byte (as a tunable it was 4 GiB; either is "never").
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEEP_FREED = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 64 << 20))
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


def decide(tunables: str, glibc: tuple[int, int] | None, thp: str | None) -> tuple[str, str | None]:
    """(SHEEPOP_MALLOC, the GLIBC_TUNABLES value to run with or None to keep it). glibc: left as it
    is where the user's GLIBC_TUNABLES names a malloc setting or the C library is not glibc. Huge
    pages only where this glibc (>= 2.35) and the kernel have them."""
    named = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    if named & set(USER_MALLOC) or glibc is None:
        return "glibc", None
    if glibc >= (2, 35) and thp in ("always", "madvise"):
        return "keep-freed", ":".join([tunables, f"{TUNABLE}=1"] if tunables else [f"{TUNABLE}=1"])
    return "keep-freed", None


def hugepages_on() -> bool:
    """Whether this process's malloc was started with huge pages (the `start` event records it)."""
    return f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


_kept = False  # keep_freed_memory() took effect in this process


def heap_only() -> bool:
    """Whether this process keeps freed memory on its heap (the `start` event records it)."""
    return _kept


def keep_freed_memory() -> bool:
    """In a training process: mallopt(KEEP_FREED) where the run's decision says so; True if it did."""
    global _kept
    if os.environ.get(DECISION) == "keep-freed" and glibc_version() is not None and not _kept:
        import ctypes

        libc = ctypes.CDLL(None)  # the C library this process runs on
        _kept = all(libc.mallopt(param, value) == 1 for param, value in KEEP_FREED)
    return _kept


def rerun_with_training_malloc() -> None:
    """Decide this run's malloc (DECISION) once; where huge pages are to be added, replace this
    process (same pid, arguments and interpreter flags) with one that starts with them."""
    if DECISION in os.environ:  # decided already: this is the process run again, or a child of one
        return
    decision, value = decide(os.environ.get("GLIBC_TUNABLES", ""), glibc_version(), thp_mode())
    os.environ[DECISION] = decision
    if value is None or sys.platform != "linux":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": value})
    except OSError:  # an interpreter that cannot be run again (a frozen app, a removed venv): train as it is
        return
