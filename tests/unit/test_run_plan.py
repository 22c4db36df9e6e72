"""The driver decides once (batch plan, resume point, prepared data) and every rank verifies.
A real Ray worker on a node without the prepared data: tests/integration/test_run_plan.py."""
from __future__ import annotations

import pytest

from sheepop.errors import UserError
from tests.helpers import plan_without_data


def test_plan_is_decided_by_the_driver(tiny_cfg, tmp_path):
    plan, _ = plan_without_data(tiny_cfg, tmp_path)
    assert plan.batch.world_size == tiny_cfg.cluster.num_workers
    assert plan.batch.global_batch_size == plan.batch.micro_batch_size * plan.batch.grad_accum_steps
    assert plan.resume is None and plan.universal is None
    with pytest.raises(UserError, match="world of 2, the run plan was made for 1"):
        plan.batch_for(2)
    assert plan.batch_for(1) is plan.batch
