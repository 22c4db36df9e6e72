"""sheepop.extensions without DeepSpeed: where ops are built, which ones, and which build
locks are stale (a fake extension folder, its lock aged with os.utime)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sheepop import extensions as ext
from sheepop.errors import UserError

HOUR = 3600


def make_lock(root: Path, op: str = "deepspeed_shm_comm", age_s: float = 0) -> Path:
    folder = root / op
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))  # as torch's FileBaton makes it
    if age_s:
        then = time.time() - age_s
        os.utime(lock, (then, then))
    return lock


def start(argv: list, **kw) -> subprocess.Popen:
    """A child that prints 'ready' once set up, then sleeps; stopped by the caller."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kw)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(r))
    return r


# --- where -----------------------------------------------------------------------------------------

def test_a_user_set_torch_extensions_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert ext.extensions_dir() == tmp_path / "mine"
    assert ext.activate() == tmp_path / "mine" and os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_default_is_a_folder_of_this_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    d = ext.extensions_dir()
    if os.access(sys.prefix, os.W_OK):
        assert d == Path(sys.prefix) / "var" / "sheepop" / "torch_extensions"
    ext.activate()  # monkeypatch restores the variable afterwards
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(d)


def test_an_empty_torch_extensions_dir_counts_as_unset(monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # torch would build in the current folder
    assert ext.activate() == ext.extensions_dir() and os.environ["TORCH_EXTENSIONS_DIR"] == str(ext.extensions_dir())
    assert os.environ["TORCH_EXTENSIONS_DIR"]


def test_two_environments_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    a, b = tmp_path / "venv-a", tmp_path / "venv-b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setattr(sys, "prefix", str(a))
    da = ext.extensions_dir()
    monkeypatch.setattr(sys, "prefix", str(b))
    db = ext.extensions_dir()
    assert da == a / "var/sheepop/torch_extensions" and db == b / "var/sheepop/torch_extensions"


def test_a_read_only_environment_gets_a_per_user_cache_folder_keyed_by_it(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ext, "_writable", lambda folder: False)
    monkeypatch.setattr(sys, "prefix", "/usr")
    usr = ext.extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/opt/py")
    assert usr.parent == tmp_path / "cache/sheepop/torch_extensions" and ext.extensions_dir() != usr


# --- which ops ----------------------------------------------------------------------------------

def test_needed_ops_follow_the_deepspeed_config():
    assert ext.needed_ops({"zero_optimization": {"stage": 2}}) == ["ShareMemCommBuilder"]
    offload = {"optimizer": {"type": "AdamW", "params": {}},
               "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert ext.needed_ops(offload) == ["ShareMemCommBuilder", "CPUAdamBuilder"]
    assert ext.needed_ops({"optimizer": {"type": "Adam"}}) == ["ShareMemCommBuilder", "FusedAdamBuilder"]
    assert ext.needed_ops({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}) == ["ShareMemCommBuilder"]


def test_needed_ops_of_sheepops_own_config(tmp_path):
    """Offload is the one sheepop setting that makes DeepSpeed build an optimizer op."""
    from sheepop.config import batch_plan, compose
    from sheepop.train.engine import deepspeed_config  # imports DeepSpeed (a few seconds), starts nothing
    from tests.helpers import tiny_overrides

    plain = compose(tiny_overrides(tmp_path))
    offload = compose(tiny_overrides(tmp_path, "parallelism.zero_stage=2", "parallelism.offload_optimizer=true"))
    assert ext.needed_ops(deepspeed_config(plain, batch_plan(plain, 1))) == ["ShareMemCommBuilder"]
    with_offload = ext.needed_ops(deepspeed_config(offload, batch_plan(offload, 1)))
    assert with_offload == ["ShareMemCommBuilder", "CPUAdamBuilder"]


# --- locks ---------------------------------------------------------------------------------------

def test_an_old_lock_with_no_builder_is_stale(root):
    lock = make_lock(root, age_s=HOUR)
    assert ext.locks() == [lock]
    assert ext.stale_locks() == [lock]
    assert ext.lock_state(lock) == "stale"


def test_a_fresh_lock_is_not_stale(root):
    lock = make_lock(root)
    assert ext.stale_locks() == []
    assert ext.lock_state(lock) == "orphan"  # waited for (it may be a builder this machine cannot see)
    ext.check_locks()


def test_a_lock_held_open_by_a_live_process_is_not_stale(root):
    lock = make_lock(root, age_s=HOUR)
    holder = start([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDONLY)
        print("ready", flush=True)
        time.sleep(60)
    """)])
    try:
        assert holder.pid in ext.builders(lock)
        assert ext.lock_state(lock) == "building"
        assert ext.stale_locks() == []
        ext.check_locks()
    finally:
        holder.kill()
        holder.wait()
    assert ext.stale_locks() == [lock]  # its builder gone, the old lock is stale


def test_a_compiler_working_in_the_folder_counts_as_a_live_builder(root, tmp_path):
    """torch closes nothing it hands ninja: ninja and the compilers are seen by name and working folder."""
    lock = make_lock(root, age_s=HOUR)
    ninja = tmp_path / "bin" / "ninja"
    ninja.parent.mkdir()
    shutil.copy(sys.executable, ninja)  # a process named ninja
    p = start([str(ninja), "-c", "import time; print('ready', flush=True); time.sleep(60)"], cwd=lock.parent)
    try:
        assert p.pid in ext.builders(lock)
        assert ext.stale_locks() == []
    finally:
        p.kill()
        p.wait()
    other = start([str(ninja), "-c", "import time; print('ready', flush=True); time.sleep(60)"], cwd=tmp_path)
    try:
        assert ext.stale_locks() == [lock]  # a ninja elsewhere builds something else
    finally:
        other.kill()
        other.wait()


def test_the_message_is_one_line_naming_the_file(root):
    lock = make_lock(root, age_s=2 * HOUR)
    make_lock(root, "cpu_adam")  # fresh: not named
    with pytest.raises(UserError) as e:
        ext.check_locks()
    msg = str(e.value)
    assert "\n" not in msg and str(lock) in msg and "cpu_adam" not in msg
    assert "2h 00m old" in msg
    assert f"rm {lock}" in msg


def test_locks_one_level_deeper_are_found(tmp_path):
    """A TORCH_EXTENSIONS_DIR above torch's own py311_cpu-style level."""
    lock = make_lock(tmp_path / "py311_cpu", age_s=HOUR)
    assert ext.stale_locks(root=tmp_path) == [lock]
    assert ext.stale_locks(root=tmp_path / "missing") == []


def test_waiting_on_an_orphan_lock_says_so_then_reports_it_stale(root):
    lock = make_lock(root)
    lines = []
    with pytest.raises(UserError, match="stale DeepSpeed build lock"):
        ext.wait_for_lock(lock, max_age_s=0.3, log=lines.append, poll_s=0.05)
    assert len(lines) == 1 and str(lock) in lines[0] and "rm " in lines[0]


def test_waiting_ends_when_the_lock_goes(root):
    import threading

    lock = make_lock(root)
    threading.Timer(0.3, lock.unlink).start()
    t = time.monotonic()
    ext.wait_for_lock(lock, max_age_s=60, log=lambda m: None, poll_s=0.05)
    assert time.monotonic() - t < 5


def test_prebuild_of_nothing_imports_nothing(root):
    assert ext.prebuild([]) == {}


def test_prebuild_reports_a_stale_lock_before_importing_deepspeed(root):
    make_lock(root, age_s=HOUR)
    code = ("import sys\nfrom sheepop import extensions as ext\nfrom sheepop.errors import UserError\n"
            "try:\n    ext.prebuild()\nexcept UserError as e:\n    print(e)\n"
            "print('deepspeed' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(ext.__file__).parents[2])})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2].startswith("stale DeepSpeed build lock") and r.stdout.splitlines()[-1] == "False"


def test_sigterm_during_a_build_removes_the_lock_and_stops_the_compilers(root, tmp_path):
    """What a timeout does to a build: the lock is released (torch's finally) and ninja's compile jobs stop."""
    lock = root / "op" / "lock"
    lock.parent.mkdir(parents=True)
    pidfile = lock.parent / "compiler.pid"
    code = textwrap.dedent(f"""
        import os, subprocess, time
        from sheepop import extensions as ext
        with ext._sigterm_cleans_up({str(root)!r}):
            fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)  # torch's FileBaton
            try:
                # "ninja" with a "compiler" of its own, both working in the build folder
                job = "sleep 60 & echo $! > compiler.tmp; mv compiler.tmp compiler.pid; wait"
                ninja = subprocess.Popen(["sh", "-c", job], cwd={str(lock.parent)!r})
                while not os.path.exists({str(pidfile)!r}):
                    time.sleep(0.01)
                print("ready", flush=True)
                try:
                    ninja.wait()
                finally:
                    ninja.kill()  # as subprocess.run does on any exception
            finally:
                os.close(fd)
                os.remove({str(lock)!r})
    """)
    p = start([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(ext.__file__).parents[2])})
    compiler = int(pidfile.read_text())
    assert running(compiler)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert not lock.exists()
    deadline = time.monotonic() + 10
    while running(compiler) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(compiler)


def running(pid: int) -> bool:
    """Alive and not a zombie (a child of a dead parent waits as one until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_every_process_that_loads_an_op_finds_this_environments_ninja_first(tmp_path, monkeypatch):
    """Another ninja earlier on PATH (a system one: 1.11 here, beside the venv's 1.13) would rebuild
    the ops each time a process with the other PATH loads them; activate() puts the `ninja`
    package's binary first, keeps the rest of PATH in order, and does so once."""
    import ninja

    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 1.0.0\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(other), "/usr/bin", "/bin"]))
    monkeypatch.setenv(ext.ENV_VAR, str(tmp_path / "ext"))
    assert shutil.which("ninja") == str(other / "ninja")
    ext.activate()
    own = os.path.join(ninja.BIN_DIR, "ninja")
    assert shutil.which("ninja") == own
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, str(other), "/usr/bin", "/bin"]
    ext.activate()
    assert os.environ["PATH"].split(os.pathsep) == [ninja.BIN_DIR, str(other), "/usr/bin", "/bin"]
