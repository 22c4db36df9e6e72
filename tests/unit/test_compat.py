"""sheepop.compat: every library workaround still works with the installed versions, and the
ones whose need can be read from the library's code are still needed (a failure after an
upgrade means: delete the workaround, or fix it)."""
from __future__ import annotations

import logging
import os
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch

from sheepop import compat


@pytest.mark.parametrize("package", sorted(compat.WRITTEN_FOR))
def test_installed_versions_are_the_ones_the_workarounds_were_written_for(package):
    # A new minor version may fix or break what compat.py works around: re-check, then move the pin.
    assert version(package).startswith(compat.WRITTEN_FOR[package] + "."), (
        f"{package} {version(package)}: compat.py was written for {compat.WRITTEN_FOR[package]}; re-check each workaround")


def test_deepspeed_still_shares_the_universal_step_tensor():
    assert compat.deepspeed_shares_universal_step(), "DeepSpeed fixed it: drop part 2 of fix_zero3_universal_load"


def test_zero3_universal_load_fix_unshares_steps_and_restores_decay():
    step = torch.tensor(5.0)
    inner = SimpleNamespace(state={"a": {"step": step}, "b": {"step": step}, "c": {"step": torch.tensor(1.0)}})
    groups = [{"weight_decay": 0.1}, {"weight_decay": 0.1}]  # what the buggy load leaves: group 0's value everywhere
    engine = SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner, param_groups=groups))
    compat.fix_zero3_universal_load(engine, [0.1, 0.0])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    a, b = inner.state["a"]["step"], inner.state["b"]["step"]
    assert a is not b and float(a) == float(b) == 5.0
    a += 1  # AdamW increments in place: the other group's counter must not move
    assert float(b) == 5.0


def test_before_deepspeed_import_picks_cpu_without_cuda(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    compat.before_deepspeed_import()
    assert os.environ["DS_ACCELERATOR"] == ("cpu" if not torch.cuda.is_available() else os.environ["DS_ACCELERATOR"])


def test_ray_private_upload_helpers_walk_like_ray(tmp_path):
    (tmp_path / "keep.py").write_text("x = 1\n")
    (tmp_path / "skip.log").write_text("noise\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big.bin").write_bytes(b"0" * 10)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    found = []
    compat.ray_upload_files(tmp_path, ["*.log"], lambda p: p.is_file() and found.append(p.name), True,
                            logging.getLogger("test"))
    assert sorted(found) == [".gitignore", "keep.py"]
    assert compat.ray_upload_limit() >= 100 * 2**20


def test_ray_job_env_vars_reads_the_jobs_runtime_env(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {"A": "1"}}}')
    assert compat.ray_job_env_vars() == {"A": "1"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert compat.ray_job_env_vars() == {}


def test_an_elastic_run_waits_less_for_a_worker_group_and_ray_train_reads_that_variable():
    """compat.RAY_TRAIN_ELASTIC_ENV reaches the controller (the job's env) of elastic runs only, under
    the name this Ray Train reads (a rename would silently bring back its 60 s wait after a node loss)."""
    from ray.train.v2._internal import constants

    from sheepop.driver.worker_env import worker_env

    (name,) = compat.RAY_TRAIN_ELASTIC_ENV
    assert name == constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    assert float(worker_env(elastic=True)[name]) < constants.DEFAULT_WORKER_GROUP_START_TIMEOUT_S
    assert name not in worker_env(elastic=False)


def test_ray_loopback_only_switches_off_ray_cluster_mode(monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    env = compat.ray_loopback_only()
    from ray._private import ray_constants

    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert env.get("GLOO_SOCKET_IFNAME") in ("lo", "lo0")


def test_hydra_private_sweep_and_escape_helpers():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeps = OverridesParser.create().parse_overrides(["a=1,2", "b=x,y"])
    combos = compat.hydra_sweep_combinations(sweeps)
    assert sorted(map(tuple, combos)) == [("a=1", "b=x"), ("a=1", "b=y"), ("a=2", "b=x"), ("a=2", "b=y")]
    assert compat.hydra_escape("a,b=(c)") == r"a\,b\=\(c\)"


def test_deepspeed_build_notice_goes_to_its_logger(capsys):
    import importlib

    import torch as real_torch

    assert compat.deepspeed_prints_build_notice(), "DeepSpeed no longer print()s it: drop quiet_deepspeed_build_notice"
    compat.quiet_deepspeed_build_notice()
    module = importlib.import_module("deepspeed.comm.torch")
    assert not hasattr(real_torch, "print")
    module.print("DeepSpeed x built successfully")
    assert "built successfully" not in capsys.readouterr().out


def test_deepspeed_muon_import_still_pulls_in_inductor():
    assert compat.deepspeed_muon_import_is_slow(), "DeepSpeed's Muon import got cheap: drop skip_deepspeed_muon"


def test_zero_engines_build_and_step_without_muon_or_inductor():
    """With the stand-in, a bf16 ZeRO-2 and a ZeRO-3 engine build and take a step without importing
    TorchInductor (trainer.compile off); the stand-in is what DeepSpeed saw."""
    import subprocess
    import sys

    code = """
import sys, torch
from sheepop.config import batch_plan, compose
from sheepop.model.transformer import Transformer
from sheepop.train import engine as eng
eng.init_distributed()
for preset in ("zero2", "zero3"):
    cfg = compose(["model=tiny", f"parallelism={preset}", "trainer.precision=bf16", "trainer.compile=false"])
    e = eng.build(Transformer(cfg.model), cfg, batch_plan(cfg, 1))
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    e.backward(e(x, x))
    e.step()
eng.shutdown()  # without it the process may abort at exit (sheepop.compat.let_gloo_threads_finish)
muon = sys.modules["deepspeed.runtime.zero.muon.muon_optimizer"]
print("inductor", "torch._inductor.compile_fx" in sys.modules, "stand-in", "stand-in" in (muon.__doc__ or ""))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "inductor False stand-in True", r.stdout + r.stderr[-2000:]


def test_inductor_cache_goes_to_the_run_unless_the_user_chose_a_folder(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    # torch's own default, inherited from a parent process that used torch, is not the user's choice
    assert compat.torch_default_inductor_cache() == default_cache_dir()

    monkeypatch.setattr(compat, "_USER_INDUCTOR_CACHE", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/torch/put/its/default")
    assert compat.inductor_cache(tmp_path / "run") == cache_dir() == str(tmp_path / "run" / "cache" / "inductor")
    monkeypatch.setattr(compat, "_USER_INDUCTOR_CACHE", str(tmp_path / "mine"))
    assert compat.inductor_cache(tmp_path / "run") == cache_dir() == str(tmp_path / "mine")


def test_ray_torch_trainer_leaves_out_the_helpers_a_run_does_not_use():
    """Ray Train still adds them by default (else the workaround is obsolete); the lean trainer drops
    them, and keeps everything else. The integration test of the default cluster checks which actors
    a real run starts (tests/integration/test_train.py)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR

    def kinds(trainer_cls):
        t = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(cb).__name__ for cb in t._create_default_callbacks()]

    default = kinds(TorchTrainer)
    assert {DatasetsCallback.__name__, PlacementGroupCleanerCallback.__name__} <= set(default)
    local, joined = kinds(compat.ray_torch_trainer(local=True)), kinds(compat.ray_torch_trainer(local=False))
    assert local == [k for k in default if k not in ("DatasetsCallback", "PlacementGroupCleanerCallback")]
    assert joined == [k for k in default if k != "DatasetsCallback"]
    assert ENABLE_PREEMPTION_WATCHER_ENV_VAR in compat.RAY_LOCAL_TRAIN_ENV
