"""Where W&B's mode comes from, and a W&B that does not start (sheepop.train.metrics)."""
from __future__ import annotations

import pytest

from sheepop.config import compose, wandb_mode
from sheepop.errors import UserError
from sheepop.train.metrics import MetricsSink


def test_auto_mode_follows_wandb_mode_then_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"  # the user's WANDB_MODE holds, key or not
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("online") == "online"  # logger.mode set explicitly wins


def test_a_wandb_run_that_does_not_start_is_one_line(monkeypatch, tmp_path):
    """W&B's servers cannot be reached from this machine: the error wandb.init raises when they
    cannot be reached is simulated here (the rest is real: the sink, its config, its message)."""
    import wandb

    def unreachable(**_kwargs):
        raise wandb.errors.CommError("Failed to get resume status for run ab12: context deadline exceeded")

    monkeypatch.setattr(wandb, "init", unreachable)
    cfg = compose(["model=tiny", "logger=wandb", "logger.mode=online", f"run.dir={tmp_path}"])
    with pytest.raises(UserError, match=r"^W&B \(online\) did not start: Failed to get resume status .*"
                                        r"logger.mode=offline .* logger=none turns W&B off$"):
        MetricsSink(cfg, rank=0)
