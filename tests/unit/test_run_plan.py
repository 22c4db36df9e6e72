"""The driver decides once (batch plan, resume point, prepared data) and every rank verifies.
A real Ray worker on a node without the prepared data: tests/integration/test_run_plan.py."""
from __future__ import annotations

import dataclasses

import pytest

from sheepop.errors import UserError


def _plan_without_data(cfg, tmp_path):
    from sheepop.data.shards import load_manifest
    from sheepop.driver.runner import make_plan

    manifest = load_manifest(cfg.data.out_dir)  # what the driver prepared, on its node
    elsewhere = tmp_path / "not-prepared-here"  # the same setting, seen from a node that lacks the data
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(tmp_path / "run")),
                              data=dataclasses.replace(cfg.data, out_dir=str(elsewhere)))
    return make_plan(cfg, None, manifest), elsewhere


def test_plan_is_decided_by_the_driver(tiny_cfg, tmp_path):
    plan, _ = _plan_without_data(tiny_cfg, tmp_path)
    assert plan.batch.world_size == tiny_cfg.cluster.num_workers
    assert plan.batch.global_batch_size == plan.batch.micro_batch_size * plan.batch.grad_accum_steps
    assert plan.resume is None and plan.universal is None
    with pytest.raises(UserError, match="world of 2, the run plan was made for 1"):
        plan.verify_world(2)
