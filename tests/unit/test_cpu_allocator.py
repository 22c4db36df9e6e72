"""sheepop.cpu_allocator: when `sheepop train` runs itself again with its glibc malloc settings.
(That the training process and a local Ray worker do get it: tests/integration/test_train.py.)"""
import os
import subprocess
import sys

from sheepop.cpu_allocator import HEAP_ONLY, TUNABLE, glibc_version, training_tunables
from tests.helpers import ROOT


def test_the_tunables_are_added_only_where_glibc_and_the_kernel_have_them():
    heap = ":".join(HEAP_ONLY)  # no mmap, a 4 GiB trim threshold, a 64 MiB top pad: freed memory stays for the next step
    assert heap == "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=67108864"
    assert training_tunables("", (2, 36), "madvise") == f"{heap}:{TUNABLE}=1"
    assert training_tunables("", (2, 35), "always") == f"{heap}:{TUNABLE}=1"
    # other tunables the user set are kept
    assert training_tunables("glibc.malloc.arena_max=2", (2, 39), "madvise") == \
        f"glibc.malloc.arena_max=2:{heap}:{TUNABLE}=1"
    assert training_tunables("", (2, 34), "madvise") == heap  # no huge-page tunable before glibc 2.35
    assert training_tunables("", (2, 36), "never") == heap  # the kernel gives no huge pages
    assert training_tunables("", (2, 36), None) == heap
    assert training_tunables("", (2, 25), "madvise") is None  # no malloc tunables before glibc 2.26
    assert training_tunables("", None, "madvise") is None  # musl, macOS
    # a malloc setting of the user's own (hugetlb=0: glibc's defaults) stands, and nothing is added to it
    for own in (f"{TUNABLE}=0", f"{TUNABLE}=1", "glibc.malloc.mmap_max=65536", "glibc.malloc.trim_threshold=131072",
                "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1048576", "glibc.malloc.top_pad=0"):
        assert training_tunables(own, (2, 36), "madvise") is None, own


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
