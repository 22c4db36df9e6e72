"""sheepop.cpu_allocator: when `sheepop train` runs itself again with glibc's malloc on huge pages.
(That the training process and a local Ray worker do get it: tests/integration/test_train.py.)"""
import os
import subprocess
import sys

from sheepop.cpu_allocator import TUNABLE, glibc_version, tunables_with_hugepages
from tests.helpers import ROOT


def test_the_tunable_is_added_only_where_glibc_and_the_kernel_have_it():
    assert tunables_with_hugepages("", (2, 36), "madvise") == f"{TUNABLE}=1"
    assert tunables_with_hugepages("", (2, 35), "always") == f"{TUNABLE}=1"
    # other tunables the user set are kept
    assert tunables_with_hugepages("glibc.malloc.arena_max=2", (2, 39), "madvise") == \
        f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert tunables_with_hugepages("", (2, 34), "madvise") is None  # no such tunable before glibc 2.35
    assert tunables_with_hugepages("", None, "madvise") is None  # musl, macOS
    assert tunables_with_hugepages("", (2, 36), "never") is None  # the kernel gives no huge pages
    assert tunables_with_hugepages("", (2, 36), None) is None
    assert tunables_with_hugepages(f"{TUNABLE}=0", (2, 36), "madvise") is None  # the user's choice (0: off) stands


def test_only_train_runs_itself_again_and_only_as_the_program():
    """`sheepop train --help` answers from the re-run process, with the tunable set; another command
    and a call of cli.main(argv) from Python code keep their process and environment."""
    probe = ("import os, sys; from sheepop import cpu_allocator as c; c.rerun_with_hugepages = "
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
