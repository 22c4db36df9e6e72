"""DeepSpeed's C++ ops, which it JIT-compiles on first use: built once per environment, ahead of
the workers, and a build lock that nobody will ever release reported instead of waited on.

DeepSpeed (installed from source, without prebuilt ops) compiles each op the first time a process
loads it, with torch.utils.cpp_extension, into $TORCH_EXTENSIONS_DIR/<op name>/ (default
~/.cache/torch_extensions/py311_cpu/<op name>/). Every load, even of an op already built, first
creates that folder's `lock` file (torch's FileBaton: O_CREAT|O_EXCL, kept open while ninja runs,
removed afterwards); a process that finds it waits, silently, until it is gone. A process killed
in that window (a timeout's SIGTERM, Ray's SIGKILL) leaves the file behind, and every later run
then waits forever after DeepSpeed's "Setting up process group". On CPU every process loads
`deepspeed_shm_comm` in deepspeed.init_distributed; `cpu_adam` with optimizer offload.

Here:
  - extensions_dir(): one folder per Python environment (<sys.prefix>/var/sheepop/torch_extensions),
    so two virtual environments never rebuild each other's ops; a user's TORCH_EXTENSIONS_DIR wins.
  - prebuild(ops): builds the ops there before any worker starts (a no-op ninja check, about a
    second, once they are built); `python -m sheepop.extensions` does it at install.
  - stale_locks()/check_locks(): a lock older than any build takes, with no process holding it or
    compiling in its folder, is reported in one line naming the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from sheepop.errors import UserError
from sheepop.units import duration

ENV_VAR = "TORCH_EXTENSIONS_DIR"
# Longer than any build of these ops takes, even on a loaded machine (measured on 2 cores with the
# load average at 3-9: deepspeed_shm_comm 2.5-6 min, 133 CPU-s; cpu_adam 4.3 min). A lock with no
# live builder that is younger may belong to a builder this machine cannot see (another host or
# container sharing the folder), so it is waited for, with a message, then reported.
LOCK_MAX_AGE_S = 15 * 60
# DeepSpeed's op builders (deepspeed.accelerator.get_accelerator().create_op_builder names).
SHM_COMM = "ShareMemCommBuilder"  # deepspeed.init_distributed on CPU
CPU_ADAM = "CPUAdamBuilder"  # Adam/AdamW with zero_optimization.offload_optimizer
FUSED_ADAM = "FusedAdamBuilder"  # Adam/AdamW named in the DeepSpeed config, no offload
DEFAULT_OPS = (SHM_COMM,)

Log = Callable[[str], None]


# --- where -----------------------------------------------------------------------------------------

def extensions_dir() -> Path:
    """The folder torch builds DeepSpeed's ops in: $TORCH_EXTENSIONS_DIR when set, else one per
    Python environment, <sys.prefix>/var/sheepop/torch_extensions (a per-user cache folder keyed
    by sys.prefix where the environment is read-only, e.g. a system Python)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])  # as torch reads it
    prefix = Path(sys.prefix)
    own = prefix / "var" / "sheepop" / "torch_extensions"
    if _writable(own):
        return own
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
    return cache / "sheepop" / "torch_extensions" / f"py{sys.version_info[0]}{sys.version_info[1]}-{key}"


def _writable(folder: Path) -> bool:
    """Whether folder exists writable or could be created (its nearest existing parent is writable)."""
    p = folder
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def activate() -> Path:
    """Set TORCH_EXTENSIONS_DIR in this process unless the user set it (torch reads it at each op
    load, so any time before deepspeed.init_distributed will do), and put this environment's ninja
    first on PATH (own_ninja_first); returns the folder. Processes started afterwards inherit both
    (Ray's local cluster, subprocesses)."""
    folder = extensions_dir()
    if not os.environ.get(ENV_VAR):  # torch would build an empty value's ops in the current folder
        os.environ[ENV_VAR] = str(folder)
    own_ninja_first()
    return folder


def own_ninja_first() -> None:
    """torch checks and builds an op with the first `ninja` on PATH at every load. Two ninja versions
    on one build folder rebuild it at each switch: ninja 1.13 hashes commands another way in its
    .ninja_log than 1.11, so each finds every command "changed". Measured here 2026-12-07: the venv's
    ninja 1.13.2 (the `ninja` package DeepSpeed depends on) for processes with the venv on PATH
    (the test suite's Ray nodes, an activated shell), /usr/bin/ninja 1.11.1 for the others
    (`.venv/bin/sheepop`, `make test`): the CPU communication op was rebuilt 16 times in one day,
    19-30 s each, while every rank waited on its lock. That package's ninja goes first, in every
    process that loads an op."""
    try:
        import ninja
    except ImportError:  # no ninja package: torch's own search stands
        return
    bin_dir = str(getattr(ninja, "BIN_DIR", ""))
    if not bin_dir or not os.path.isfile(os.path.join(bin_dir, "ninja")):
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(d for d in path.split(os.pathsep) if d and d != bin_dir)])


# --- which ops ----------------------------------------------------------------------------------

def needed_ops(ds_config: dict | None = None) -> list[str]:
    """The op builders a run with this DeepSpeed config loads on this machine's accelerator:
    the CPU communication op always (deepspeed.init_distributed, CPU only), and the optimizer's op
    when DeepSpeed builds the optimizer itself (config `optimizer`: CPU Adam with offload,
    FusedAdam without; none with `torch_adam`). Ops the accelerator lacks are skipped by prebuild."""
    ops = [SHM_COMM]
    opt = (ds_config or {}).get("optimizer") or {}
    kind = str(opt.get("type", "")).lower()
    offload = ((ds_config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    cpu_optimizer = str(offload.get("device", "none")).lower() in ("cpu", "nvme")
    if kind in ("adam", "adamw") and not (opt.get("params") or {}).get("torch_adam"):
        ops.append(CPU_ADAM if cpu_optimizer else FUSED_ADAM)
    elif kind == "adagrad" and cpu_optimizer:
        ops.append("CPUAdagradBuilder")
    elif kind == "lion":
        ops.append("CPULionBuilder" if cpu_optimizer else "FusedLionBuilder")
    return ops


# --- locks ---------------------------------------------------------------------------------------

# Programs that run inside a build folder (ninja's cwd is the folder; it starts the compilers there).
_BUILD_TOOL = re.compile(r"(^|[-_])(ninja|cc1plus|cc1|c\+\+|g\+\+|gcc|cc|clang\+\+|clang|ld|ld\.\w+|collect2|as|"
                         r"nvcc|hipcc|cicc|ptxas|fatbinary|icpx|icx|ccache|sccache)(-[\d.]+)?$")


def locks(root: Path | None = None) -> list[Path]:
    """Every build lock file under root (default extensions_dir()): <root>/<op>/lock, and one
    level deeper for a root above torch's py311_cpu-style folder."""
    root = Path(root) if root is not None else extensions_dir()
    if not root.is_dir():
        return []
    found = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    return sorted(p for p in found if p.is_file())


def builders(lock: Path) -> list[int]:
    """PIDs of live processes building in lock's folder: holding the lock file open (torch's
    FileBaton keeps it open for the whole build) or a compiler/ninja working in that folder.
    Processes this user may not inspect are not seen (then only the lock's age tells)."""
    target = os.path.realpath(lock)
    folder = os.path.realpath(Path(lock).parent)
    try:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []  # no /proc (not Linux): nothing can be seen
    live = []
    for pid in pids:
        if _holds(pid, target) or _compiles_in(pid, folder):
            live.append(pid)
    return live


def _holds(pid: int, target: str) -> bool:
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) == target:
                        return True
                except OSError:
                    continue
    except OSError:
        pass
    return False


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _compiles_in(pid: int, folder: str) -> bool:
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    names = {os.path.basename(argv[0]) if argv else "", comm}
    if not any(n and _BUILD_TOOL.search(n) for n in names):
        return False
    try:
        if _inside(os.readlink(f"/proc/{pid}/cwd"), folder):
            return True
    except OSError:
        pass
    return any(_inside(a, folder) or folder in a for a in argv[1:])


def _age(lock: Path) -> float | None:
    """Seconds since the lock was created (FileBaton never writes to it), None when it is gone."""
    try:
        return max(0.0, time.time() - lock.stat().st_mtime)
    except FileNotFoundError:
        return None


def lock_state(lock: Path, max_age_s: float = LOCK_MAX_AGE_S) -> str:
    """'gone', 'building' (a live process builds there), 'stale' (no live builder, older than
    max_age_s) or 'orphan' (no live builder seen, younger: perhaps one this machine cannot see)."""
    lock = Path(lock)
    if _age(lock) is None:
        return "gone"
    if builders(lock):
        return "building"
    age = _age(lock)  # after the scan: a builder that released meanwhile has removed the file
    if age is None:
        return "gone"
    return "stale" if age >= max_age_s else "orphan"


def stale_locks(max_age_s: float = LOCK_MAX_AGE_S, root: Path | None = None) -> list[Path]:
    """Lock files under root (default extensions_dir()) older than max_age_s that no live process
    holds or builds beside: left by a build that was killed."""
    return [lock for lock in locks(root) if lock_state(lock, max_age_s) == "stale"]


def stale_message(stale: list[Path]) -> str:
    """One line naming the stale lock file(s) and what to do."""
    first = stale[0]
    age = _age(first)
    what = (f"DeepSpeed build lock {first}" if len(stale) == 1 else
            f"{len(stale)} DeepSpeed build locks ({', '.join(map(str, stale))})")
    return (f"stale {what}: {duration(age or 0)} old and no process is building there (a build was killed); "
            f"every DeepSpeed process would wait on it forever: if no build is running, delete it "
            f"(rm {' '.join(map(str, stale))}) and run again")


def check_locks(max_age_s: float = LOCK_MAX_AGE_S, root: Path | None = None) -> None:
    """Raise UserError, in one line naming the file, when a build lock under root is stale."""
    stale = stale_locks(max_age_s, root)
    if stale:
        raise UserError(stale_message(stale))


def wait_for_lock(lock: Path, max_age_s: float = LOCK_MAX_AGE_S, log: Log = print, poll_s: float = 1.0) -> None:
    """Return once lock is gone. While a live process builds there, wait (saying so once); a lock
    with no live builder is waited for, with a message, until it is max_age_s old, then UserError."""
    said = None
    while True:
        state = lock_state(lock, max_age_s)
        if state == "gone":
            return
        if state == "stale":
            raise UserError(stale_message([lock]))
        if state != said:
            if state == "building":
                log(f"waiting for the DeepSpeed build running in {lock.parent} "
                    f"(process {', '.join(map(str, builders(lock))) or '?'})")
            else:
                age = _age(lock) or 0
                log(f"waiting on DeepSpeed build lock {lock}: no process on this machine is building there; "
                    f"if no build is running elsewhere, delete it (rm {lock}); it is reported as stale in "
                    f"{duration(max(0.0, max_age_s - age))}")
            said = state
        time.sleep(poll_s)


# --- build ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _sigterm_cleans_up(root: Path):
    """SIGTERM (a timeout, `kill`) normally ends Python at once: torch's lock stays behind and ninja's
    compilers run on. During a build, stop this process's build processes (those working under
    root) and raise instead, so torch removes its lock on the way out."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        _stop_build_children(str(os.path.realpath(root)))
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _descendants(pid: int) -> list[int]:
    parent = {}
    for e in os.scandir("/proc"):
        if e.name.isdigit():
            try:
                parent[int(e.name)] = int(Path(e.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_build_children(root: str, timeout_s: float = 5.0) -> None:
    """SIGTERM this process's descendants that work under root (ninja, the compilers), then wait a
    little for them: ninja alone would be SIGKILLed by subprocess.run and leave its compilers running."""
    try:
        pids = []
        for pid in _descendants(os.getpid()):
            try:
                if _inside(os.readlink(f"/proc/{pid}/cwd"), root):
                    pids.append(pid)
            except OSError:
                continue
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
    except OSError:
        pass  # no /proc: subprocess.run still kills ninja


def _short(error: BaseException) -> str:
    """The telling line of a build error (torch puts the whole ninja output in the message)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln.lower() or "fatal" in ln.lower():
            return ln
    return lines[0] if lines else type(error).__name__


def prebuild(ops: Iterable[str] = DEFAULT_OPS, log: Log = print, max_age_s: float = LOCK_MAX_AGE_S,
             poll_s: float = 1.0) -> dict[str, float | None]:
    """Build DeepSpeed's ops (builder class names, e.g. needed_ops(ds_config)) in extensions_dir(),
    as each process would on first use, so no worker builds or waits. A no-op ninja check where
    built (about 1 s with DeepSpeed's import). Sets TORCH_EXTENSIONS_DIR (activate) and, without
    CUDA, DS_ACCELERATOR=cpu in this process. Returns seconds per op (None: skipped, this
    accelerator has no such op). Raises UserError on a stale lock or a failed build."""
    ops = list(dict.fromkeys(ops))
    if not ops:
        return {}
    root = activate()
    check_locks(max_age_s, root)

    from sheepop import compat

    compat.before_deepspeed_import()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    timings: dict[str, float | None] = {}
    for op in ops:
        builder = accelerator.create_op_builder(op)
        name = getattr(builder, "NAME", None)
        if builder is None or name in (None, "deepspeed_not_implemented") or not builder.is_compatible(False):
            timings[op] = None
            continue
        folder = root / name
        wait_for_lock(folder / "lock", max_age_s, log, poll_s)
        cold = not (folder / f"{name}.so").exists()
        if cold:
            log(f"building DeepSpeed's {name} op for this environment in {folder} "
                "(once per environment: from ~20 s to minutes on a busy machine)")
        start = time.monotonic()
        try:
            with _sigterm_cleans_up(root):
                builder.load(verbose=False)
        except (RuntimeError, ImportError, OSError) as e:
            raise UserError(f"building DeepSpeed's {name} op in {folder} failed: {_short(e)}; fix the compiler "
                            f"set-up (g++ and ninja), or delete {folder} if it holds a broken build, and run again"
                            ) from e
        timings[op] = time.monotonic() - start
        if cold:
            log(f"built DeepSpeed's {name} op in {timings[op]:.0f} s")
    return timings


def main(argv: list[str] | None = None) -> int:
    """`python -m sheepop.extensions [BUILDER ...]`: build the ops (default: the CPU
    communication op) in this environment's folder, e.g. from `make install`."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(main.__doc__)
        return 0
    try:
        timings = prebuild(args or DEFAULT_OPS, log=lambda m: print(m, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for op, seconds in timings.items():
        print(f"{op}: " + ("not used on this accelerator" if seconds is None else f"ready ({seconds:.1f} s)"))
    print(f"DeepSpeed ops in {extensions_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
