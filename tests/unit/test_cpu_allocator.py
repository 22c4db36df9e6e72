"""sheepop.cpu_allocator: the run's malloc decision, the huge-page re-run, and a training process
keeping freed memory. (That `sheepop train`'s training process and a local Ray worker do:
tests/integration/test_train.py.)"""
import os
import subprocess
import sys

from sheepop.cpu_allocator import DECISION, TUNABLE, decide, glibc_version
from tests.helpers import ROOT


def test_huge_pages_are_added_only_where_glibc_and_the_kernel_have_them():
    hp = f"{TUNABLE}=1"
    assert decide("", (2, 36), "madvise") == ("keep-freed", hp)
    assert decide("", (2, 35), "always") == ("keep-freed", hp)
    # other tunables the user set are kept
    assert decide("glibc.malloc.arena_max=2", (2, 39), "madvise") == ("keep-freed", f"glibc.malloc.arena_max=2:{hp}")
    assert decide("", (2, 34), "madvise") == ("keep-freed", None)  # no huge-page tunable before glibc 2.35
    assert decide("", (2, 36), "never") == ("keep-freed", None)  # the kernel gives no huge pages
    assert decide("", (2, 36), None) == ("keep-freed", None)
    assert decide("", None, "madvise") == ("glibc", None)  # musl, macOS
    # a malloc setting of the user's own (hugetlb=0: glibc's defaults) stands, and nothing is added to it
    for own in (f"{TUNABLE}=0", f"{TUNABLE}=1", "glibc.malloc.mmap_max=65536", "glibc.malloc.trim_threshold=131072",
                "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1048576", "glibc.malloc.top_pad=0"):
        assert decide(own, (2, 36), "madvise") == ("glibc", None), own


KEEP_PROBE = """
import ctypes, os, sys
from sheepop import cpu_allocator as c

class Info(ctypes.Structure):  # struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
print("kept", c.keep_freed_memory(), c.heap_only())
before = libc.mallinfo2()
big = ctypes.create_string_buffer(100 << 20)  # 100 MB: over any mmap threshold
mapped = libc.mallinfo2().hblkhd - before.hblkhd
del big
print("mapped", mapped, "heap_kept", libc.mallinfo2().arena - before.arena)
"""


def test_a_training_process_keeps_freed_memory_only_where_the_run_decided_so():
    """mallopt in the process itself (a Ray worker's helpers and siblings are left alone): a 100 MB
    block comes from the heap and stays there once freed; with the decision `glibc`, glibc maps it
    afresh and unmaps it."""
    if glibc_version() is None or glibc_version() < (2, 33):
        import pytest

        pytest.skip("needs glibc's mallinfo2 to look at the heap")

    def probe(decision: str) -> list[str]:
        env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, DECISION: decision}
        r = subprocess.run([sys.executable, "-c", KEEP_PROBE], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    kept = probe("keep-freed")
    assert kept[:3] == ["kept", "True", "True"], kept
    assert int(kept[4]) == 0 and int(kept[6]) >= 100 << 20, kept  # from the heap, and still there after free
    plain = probe("glibc")
    assert plain[:3] == ["kept", "False", "False"], plain
    assert int(plain[4]) >= 100 << 20 and int(plain[6]) < 100 << 20, plain  # its own mapping, gone after free


def test_only_train_runs_itself_again_and_only_as_the_program():
    """`sheepop train --help` answers from the re-run process, with the tunable set; another command
    and a call of cli.main(argv) from Python code keep their process and environment."""
    probe = ("import os, sys; from sheepop import cpu_allocator as c; c.rerun_with_training_malloc = "
             "lambda: print('RERUN', flush=True); from sheepop.cli import main; sys.argv = ['sheepop'] + sys.argv[1:]; "
             "main(%s)")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def out(argv_expr: str, *args: str) -> str:
        r = subprocess.run([sys.executable, "-c", probe % argv_expr, *args], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=120)
        return r.stdout
    assert out("", "train", "--help").startswith("RERUN")
    assert "RERUN" not in out("", "plan", "--help")
    assert "RERUN" not in out("['train', '--help']", "x")


def test_glibc_version_reads_this_c_library():
    v = glibc_version()
    assert v is None or (v[0] == 2 and v[1] > 0)
