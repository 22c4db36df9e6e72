"""sheepop.extensions with real DeepSpeed builds, each in its own TORCH_EXTENSIONS_DIR:
a prebuild is done once (the second is a no-op check and a DeepSpeed rank then loads the op
without building), a timeout mid-build leaves no lock, and a killed build's lock is reported."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sheepop import extensions as ext
from sheepop.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SHM = "deepspeed_shm_comm"


def env_for(folder: Path) -> dict[str, str]:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(folder), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}


def prebuild_cli(folder: Path, **kw):
    return subprocess.Popen([sys.executable, "-m", "sheepop.extensions"], env=env_for(folder), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_prebuild_once_then_a_rank_loads_the_op_without_building(tmp_path):
    folder = tmp_path / "ext"
    so = folder / SHM / f"{SHM}.so"
    times = []
    for _ in range(2):
        start = time.monotonic()
        p = prebuild_cli(folder)
        out, _ = p.communicate(timeout=1500)
        times.append(time.monotonic() - start)
        assert p.returncode == 0, out
        assert so.is_file() and not (folder / SHM / "lock").exists()
        if len(times) == 1:
            built = so.stat().st_mtime_ns
            assert "building DeepSpeed's deepspeed_shm_comm op" in out
        else:
            assert "building" not in out  # nothing to say when it is there
    print(f"prebuild cold {times[0]:.1f} s, warm {times[1]:.1f} s")
    assert so.stat().st_mtime_ns == built and times[1] < times[0]

    # A rank of world size 1, as sheepop.train.engine starts one: init_distributed loads the op.
    rank = ("import time, deepspeed; t = time.monotonic(); "
            "deepspeed.init_distributed(dist_backend='gloo', verbose=False); "
            "print(f'init {time.monotonic() - t:.1f}'); "
            "import torch.distributed as d; d.barrier(); d.destroy_process_group()")
    env = {**env_for(folder), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    r = subprocess.run([sys.executable, "-c", rank], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout.strip().splitlines()[-1])
    assert so.stat().st_mtime_ns == built, "the rank rebuilt the op"
    assert not (folder / SHM / "lock").exists()


def test_a_timeout_mid_build_leaves_no_lock_and_no_compiler(tmp_path):
    """SIGTERM (what `timeout` sends) during the build: the lock goes, ninja and the compilers stop."""
    folder = tmp_path / "ext"
    lock = folder / SHM / "lock"
    p = prebuild_cli(folder)
    try:
        wait_for(lock.exists, 300, "the build to start")
        wait_for(lambda: ext.builders(lock) and any(_is_compiler(pid) for pid in ext.builders(lock)), 60,
                 "a compiler in the build folder")
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + signal.SIGTERM
    assert not lock.exists()
    wait_for(lambda: not ext.builders(lock), 30, "the compilers to stop")


def test_a_killed_build_is_reported_in_one_line(tmp_path, monkeypatch):
    """The build killed with SIGKILL, compilers too (no clean-up): the lock stays; once older
    than the limit it is named, and prebuild raises instead of waiting forever like DeepSpeed."""
    folder = tmp_path / "ext"
    lock = folder / SHM / "lock"
    p = prebuild_cli(folder, start_new_session=True)
    try:
        wait_for(lock.exists, 300, "the build to start")
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    # ninja starts each compile job in a process group of its own: those compilers, still working
    # in the folder, are live builders (and are what the test started): stop them too.
    wait_for(lambda: [os.kill(pid, signal.SIGKILL) for pid in ext.builders(lock)] == [], 30,
             "the build's processes to die")
    assert lock.exists()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(folder))
    assert ext.stale_locks() == []  # young: it might be a builder this machine cannot see
    assert ext.stale_locks(max_age_s=0) == [lock]
    with pytest.raises(UserError) as e:
        ext.prebuild(max_age_s=0)
    assert "\n" not in str(e.value) and str(lock) in str(e.value)
    # Younger than the limit: prebuild says so once, waits, then reports it.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::FutureWarning")
    import deepspeed.accelerator  # noqa: F401  (imported beforehand: the wait below is what is timed)

    os.utime(lock)
    lines = []
    start = time.monotonic()
    with pytest.raises(UserError, match="stale DeepSpeed build lock"):
        ext.prebuild(max_age_s=3, log=lines.append, poll_s=0.1)
    assert 2 < time.monotonic() - start < 60
    assert len(lines) == 1 and str(lock) in lines[0] and "waiting on DeepSpeed build lock" in lines[0]


def _is_compiler(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("ninja", "cc1plus", "c++", "g++", "gcc", "cc")
    except OSError:
        return False


def _free_port() -> int:
    from sheepop.net import free_port

    return free_port()
