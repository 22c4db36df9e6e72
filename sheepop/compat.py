"""Workarounds for the libraries sheepop stands on, gathered in one place.

Each is tied to the versions it was written against (the pins in constraints.txt) and checked by
tests/unit/test_compat.py: that it still works with the installed version and, where the
library's code shows it, that the library still needs it. When a check fails after an upgrade,
the workaround is either obsolete (delete it and its callers' use) or broken (fix it here).
Nothing outside this module reaches into a library's private API.
"""
from __future__ import annotations

import contextlib

import json
import os
import socket

# The versions these workarounds were written and tested against.
WRITTEN_FOR = {"torch": "2.13", "deepspeed": "0.19", "ray": "2.60", "hydra-core": "1.3", "pyarrow": "26.0"}


# --- DeepSpeed 0.19 / torch 2.13 -----------------------------------------------------------------

def before_deepspeed_import() -> None:
    """DeepSpeed picks its accelerator when first imported and, without CUDA, auto-detection
    warns: say CPU before anything imports it. torch 2.13 emits a FutureWarning on every
    all_gather_into_tensor/reduce_scatter_tensor that DeepSpeed calls each step."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    skip_deepspeed_muon()


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_deepspeed_muon() -> None:
    """DeepSpeed 0.19 imports its Muon optimizer module whenever it builds a ZeRO or bf16 optimizer,
    only to ask isinstance(optimizer, MuonWithAuxAdam). That module's kernels are torch.compile'd
    at import, which imports TorchInductor: 1.3-2.1 s of every rank's start-up here (bench/startup.py)
    for an optimizer sheepop never builds. A stand-in module whose MuonWithAuxAdam nothing is an
    instance of answers the question instead. Idempotent; a no-op if the real one is loaded."""
    import sys
    import types

    if MUON_MODULE in sys.modules:
        return
    stand_in = types.ModuleType(MUON_MODULE, "sheepop's stand-in (sheepop.compat.skip_deepspeed_muon)")

    class MuonWithAuxAdam:  # never instantiated: isinstance(sheepop's optimizer, it) is False
        pass

    stand_in.MuonWithAuxAdam = MuonWithAuxAdam
    sys.modules[MUON_MODULE] = stand_in


def deepspeed_muon_import_is_slow() -> bool:
    """True while importing DeepSpeed's Muon module still imports TorchInductor (skip_deepspeed_muon
    is still worth it). Run in a fresh process: the answer depends on what is imported already."""
    import subprocess
    import sys

    code = (f"import sys, deepspeed, {MUON_MODULE}; "
            "print('torch._inductor.compile_fx' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    return r.stdout.strip().endswith("True")


def fix_zero3_universal_load(engine, weight_decays: list) -> None:
    """Two DeepSpeed 0.19 ZeRO-3 universal-checkpoint load bugs (stage3.py); call right after
    engine.load_checkpoint with the groups' weight decays read before it.

    1. The load copies param group 0's hyperparameters onto every group, which would start
       decaying the norm weights: restore each group's own weight decay.
    2. It gives every optimizer sub-group the same `step` tensor object
       (`state[fp32_param]['step'] = state_step` in a loop). torch's AdamW increments `step` in
       place once per sub-group, so the shared counter advanced by the number of groups per
       training step and the bias correction went wrong (losses drifted by ~5e-3 over 6 steps).
       Give each sub-group its own copy. Both are no-ops where nothing is wrong (native loads, ZeRO 0-2).
    """
    import torch

    for group, wd in zip(engine.optimizer.param_groups, weight_decays):
        group["weight_decay"] = wd
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    seen = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


# How long a process that used gloo waits, after its last collective, before the interpreter may
# finalize. A gloo worker thread drops a finished collective (and the tensors it holds) only after the
# caller has seen it complete. When that drop frees a tensor Python made, the thread takes the GIL; if
# the interpreter is finalizing by then, the thread is made to exit, unwinds through a noexcept C++
# destructor and the process aborts (SIGABRT, "terminate called without an active exception"). torch
# 2.13; pytorch/pytorch#179291 describes it and was abandoned. Seen here: 1 in 14 runs of
# tests/integration/test_plan.py's two ranks (core dump: ~AsyncAllgatherWork -> decref_pyobject ->
# take_gil -> pthread_exit, main thread in Py_FinalizeEx). Sleeping hands those threads the GIL first.
GLOO_DRAIN_S = 0.2


def let_gloo_threads_finish() -> None:
    """Call after the last collective (a barrier, so every earlier one has completed)."""
    import time

    time.sleep(GLOO_DRAIN_S)


def deepspeed_shares_universal_step() -> bool:
    """Whether the installed DeepSpeed still has bug 2 of fix_zero3_universal_load (read from its source)."""
    import inspect

    from deepspeed.runtime.zero import stage3

    return "['step'] = state_step" in inspect.getsource(stage3)


def torch_default_inductor_cache() -> str:
    """torch 2.13's default Inductor cache folder (cache_dir_utils.default_cache_dir, without importing it)."""
    import getpass
    import re
    import tempfile

    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


# The user's own TORCHINDUCTOR_CACHE_DIR, if any, read before anything in this process compiled. torch's
# cache_dir() writes its default into the environment on first use, so a parent process that used torch
# (a notebook, pytest) hands its children that default: not a choice the user made.
_USER_INDUCTOR_CACHE = (os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != torch_default_inductor_cache() else None)


def inductor_cache(run_dir) -> str:
    """Point torch.compile's on-disk caches (Inductor's FX graph cache and AOTAutograd's cache, both
    on by default in torch 2.13, and Triton's kernels on GPU, which live below it) at
    <run.dir>/cache/inductor, unless the user set TORCHINDUCTOR_CACHE_DIR: a restarted run (a Ray
    Train restart, a resume) then loads its compiled blocks instead of compiling them again.
    torch's default, /tmp/torchinductor_<user>, is per machine and may be cleaned between restarts.
    Call before the first compile; returns the folder."""
    from pathlib import Path

    path = _USER_INDUCTOR_CACHE or str(Path(run_dir).absolute() / "cache" / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


# --- Ray 2.60 --------------------------------------------------------------------------------------

def ray_loopback_only() -> dict[str, str]:
    """Make the Ray instance this process starts listen on 127.0.0.1 only; returns env vars for its workers.

    Ray 2.60 has no bind-address setting. Its gRPC servers (GCS, raylet, object manager, core
    workers, agents) bind loopback only when the node IP is loopback, but on Linux Ray rewrites a
    node IP of 127.0.0.1 to the machine's external address (services.resolve_ip_for_localhost)
    unless ENABLE_RAY_CLUSTER is off, which RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does (read once,
    at `import ray`: set both). Ray's own processes inherit the variable. It also stops other
    machines from joining: right for a single-machine cluster. Gloo's listeners follow
    GLOO_SOCKET_IFNAME (the loopback interface). What remains is PyTorch's TCPStore on rank 0,
    which binds all interfaces while training runs.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    loopback = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
    return {"GLOO_SOCKET_IFNAME": loopback} if loopback else {}


def ray_local_env() -> None:
    """Before starting a Ray instance on this machine. Ray 2.60 turns token authentication on by
    default and announces it with a warning on every start; sheepop keeps it on deliberately, so
    the announcement is not shown (it is still in Ray's logs). RAY_AUTH_MODE cannot be set here
    instead: Ray reads it when imported."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


# What Ray Train 2.60 starts beside a run's workers that a sheepop run does not use. Each is one more
# Python process (2-3 CPU-s to start here), started while the first step is awaited:
#  - a DatasetManager, which imports Ray Data, even for a trainer without datasets (sheepop reads
#    its own shards);
#  - on a Ray started for one run (cluster=local): the PlacementGroupCleaner (the placement group
#    goes with that Ray), the PreemptionWatcher (one node, nothing to drain; sheepop's StopForwarder
#    watches drains where there are several) and Ray Data's autoscaling coordinator, which the Train
#    controller asks for resources, with a wait of up to 5 s, before it places any worker. No
#    autoscaler reads it there.
RAY_LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # No idle workers prestarted (one per CPU): the Train controller and its workers have a
    # runtime_env of their own and start their own processes, so the prestarted ones only take
    # CPU from them.
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}


@contextlib.contextmanager
def keep_sigterm_handler():
    """ray.init (2.60, worker.py) replaces the process's SIGTERM handler with `sys.exit(15)`: a
    SIGTERM between Ray's start and training would end the driver silently. The handler in place
    before (sheepop.cli's, then the stop forwarder's) comes back once Ray has started."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def ray_torch_trainer(local: bool):
    """Ray Train's TorchTrainer less the helpers above (local: the Ray was started for this run)."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    except ImportError:  # another Ray: its own trainer, helpers and all
        return TorchTrainer
    unused = (DatasetsCallback, PlacementGroupCleanerCallback) if local else (DatasetsCallback,)

    class NoAutoscalerPolicy(FixedScalingPolicy):  # sent to the controller by value (cloudpickle)
        def after_controller_start(self, train_run_context) -> None:
            pass  # no resource request, so no coordinator actor

        def _maybe_send_resource_request(self) -> None:
            pass

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unused)]

        def _register_sigint_handler(self, controller) -> None:
            """Ray Train 2.60's fit() replaces the process's SIGINT handler with one that aborts the
            controller at once: Ctrl-C killed a run with no checkpoint, no `stop` event, exit 1.
            sheepop's own handler (driver.stop_forwarder: every rank saves at its next step, then
            the run ends with exit 75) stays in place."""

        def _initialize_and_run_controller(self, **kwargs):
            if local and type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = NoAutoscalerPolicy(scaling_config=self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return LeanTorchTrainer


def ray_session_logs_dir():
    """The logs folder of the Ray session this process is connected to (private in Ray 2.60)."""
    from pathlib import Path

    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


def quiet_deepspeed_build_notice() -> None:
    """DeepSpeed 0.19 prints 'DeepSpeed ... built successfully' with print() each time a process
    loads its CPU communication op (deepspeed/comm/torch.py: build_shm_op): route it to the
    DeepSpeed's logger at INFO instead (sheepop keeps that logger at WARNING)."""
    import importlib

    from deepspeed.utils import logger

    # Not `import deepspeed.comm.torch as m`: the package's `torch` attribute is torch itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.print = lambda *args, **kwargs: logger.info(" ".join(map(str, args)))


def deepspeed_prints_build_notice() -> bool:
    """Whether the installed DeepSpeed still print()s its build notice (see quiet_deepspeed_build_notice)."""
    import importlib
    import inspect

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    return "print(f'DeepSpeed {builder.absolute_name()} built successfully')" in inspect.getsource(ds_comm_torch)


# How often the Ray Train controller polls each worker (Ray 2.x Train V2; its default is 2 s). It
# is how soon the controller takes a reported checkpoint, sees a dead worker or the end of training.
# Each poll runs on the worker's main thread and takes the GIL from the training thread: at 0.1 s a
# `model=small` step took ~5% longer than at 0.5 s (2026-12-07, 2 cores, cluster=local: median 470
# vs 432 ms; 445 ms at 2 s). What a restart loses no longer depends on it: a restarted group goes on
# from the newest checkpoint this launch completed in storage, taken by the controller or not
# (sheepop.train.restart; at 0.5 s without it, a worker killed soon after a save restarted from an
# older checkpoint). A user's own setting is kept.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}

# How long Ray Train (2.60) waits for a worker group's placement group before it gives up on that size
# and decides again (its default is 60 s). An elastic run (cluster.min_workers) picks the size from
# the resources Ray reports ready, so the group's placement group is ready at once, unless a node
# lost a moment ago was still counted: then the wait is pure loss. Measured 2026-12-07 (2 nodes on
# 127.0.0.1, one stopped after a drain): the restart asked for 2 workers, waited the full 60 s, then
# went on with 1. A fixed-size run keeps Ray's wait (an autoscaler may be adding its nodes). A user's
# own setting is kept.
RAY_TRAIN_ELASTIC_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":
                         os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")}


def ray_job_env_vars() -> dict[str, str]:
    """Inside a Ray Job, the env vars of the job's runtime_env. Ray refuses to merge a driver
    env var that the job also sets (and its error message prints the value)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    return dict(job.get("env_vars") or {})


# A submitted job's driver calls ray.init(runtime_env=...) again; without this Ray refuses to
# merge the job's and the driver's env_vars.
RAY_JOB_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}


def ray_draining_nodes() -> dict[str, int]:
    """{node id (hex): drain deadline (ms since the epoch; 0 = none)} of the nodes being drained
    (`ray drain-node`, what an autoscaler does on a spot notice). Ray 2.60 has no public API for
    it: this is the private call Ray Train's own preemption watcher uses. Needs ray.init."""
    from ray._private.state import state

    return dict(state.get_draining_nodes())


def ray_upload_files(working_dir, excludes: list[str], add, include_gitignore: bool, logger) -> None:
    """Walk the files Ray would upload as a job's working_dir, with Ray's own rules (its excludes
    and .gitignore/.rayignore handling), calling add(path) for each. Private in Ray 2.60."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    _dir_travel(working_dir, [_get_excludes(working_dir, excludes)], add, include_gitignore=include_gitignore,
                logger=logger)


def ray_upload_limit() -> int:
    """Ray's size limit for a working_dir package (private in Ray 2.60)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


# --- pyarrow 26.0 (GcsFileSystem) ------------------------------------------------------------------
# pyarrow's GCS filesystem treats a folder as real only when a marker object ("a/b/") exists. A
# file written to gs://bucket/a/b/c creates no markers (nothing does but create_dir), so on GCS:
#   - a non-recursive listing asks GCS for objects with a delimiter and drops the "prefixes" GCS
#     answers with: gs://bucket/a lists as empty although a/b/c is there;
#   - delete_dir deletes the files, then the marker, and fails with NotFound when there is none.
# Checked against fake-gcs-server by tests/integration/test_storage.py (the GCS tests).

def gcs_listdir(fs, path: str) -> list[str]:
    """Names directly inside `path` on a GcsFileSystem: from a recursive listing (which has no
    delimiter, so nothing is dropped), folders with or without markers."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted({i.path[len(path):].strip("/").split("/", 1)[0] for i in infos} - {""})


def gcs_delete_dir(fs, path: str) -> None:
    """delete_dir on a GcsFileSystem, for a folder that may have no marker object."""
    import pyarrow.fs as pafs

    fs.delete_dir_contents(path, missing_dir_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:  # a marker that create_dir made is left
        fs.delete_dir(path)  # (delete_file refuses a marker; delete_dir without one raises)


# --- Hydra 1.3 -------------------------------------------------------------------------------------

def hydra_sweep_combinations(sweeps: list) -> list[list[str]]:
    """Every combination of parsed sweep overrides (`a=1,2 b=x,y`), as Hydra's BasicSweeper makes
    them (no public API in Hydra 1.3)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [list(c) for c in BasicSweeper.split_arguments(sweeps, None)[0]]


def hydra_escape(value: str) -> str:
    """Escape a value for a Hydra override (Hydra 1.3 keeps this helper private)."""
    from hydra._internal.grammar.utils import escape_special_characters

    return escape_special_characters(value)
