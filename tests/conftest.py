"""Shared test setup: nothing lands in the home directory, W&B stays offline, Ray stays local."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_TMP = Path(os.environ.get("SHEEPOP_TEST_TMP", "/tmp/sheepop-tests"))
_TMP.mkdir(parents=True, exist_ok=True)

os.environ.update({
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": str(_TMP / "wandb"),
    "WANDB_CONFIG_DIR": str(_TMP / "wandb-config"),
    "WANDB_CACHE_DIR": str(_TMP / "wandb-cache"),
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)

# Prepared corpora are shared by all tests (and reused across runs: prepare() checks inputs).
DATA_DIR = _TMP / "data"


def sheepop(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path | None = None):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "sheepop.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    """A fast, deterministic in-process run of the tiny model on a slice of the stdlib."""
    return ["model=tiny", "trainer=quick", "cluster=process", "logger=none", f"run.dir={run_dir}",
            "data.max_bytes=3000000", f"data.out_dir={DATA_DIR}/stdlib-3mb-v1024", *extra]


@pytest.fixture(scope="session")
def tiny_cfg():
    """Composed config dict for the tiny model with its data prepared."""
    from sheepop.config import compose, to_dict
    from sheepop.data.shards import prepare

    cfg = to_dict(compose(tiny_overrides(_TMP / "unused")))
    prepare(cfg, log=lambda *_: None)
    return cfg
