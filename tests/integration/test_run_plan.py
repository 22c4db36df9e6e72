"""The driver decides once (batch plan, resume point, prepared data) and every rank verifies:
a worker on a node without the prepared data fails in one line instead of preparing it.
The plan itself, without Ray: tests/unit/test_run_plan.py."""
from __future__ import annotations

import dataclasses

import pytest

from sheepop.errors import UserError
from tests.helpers import plan_without_data


def test_ray_worker_without_prepared_data_fails_in_one_line(tiny_cfg, tmp_path):
    """A real Ray Train worker gets a plan whose data folder is missing on its node: the run fails
    with the worker's one-line error, and nothing is prepared there."""
    from rich.console import Console

    from sheepop.driver.ray_runner import fit

    plan, elsewhere = plan_without_data(tiny_cfg, tmp_path)
    cfg = dataclasses.replace(plan.cfg, cluster=dataclasses.replace(plan.cfg.cluster, kind="local", num_cpus=2))
    plan = dataclasses.replace(plan, cfg=cfg)
    with pytest.raises(UserError) as err:
        fit(plan, Console(quiet=True))
    message = str(err.value)
    assert "\n" not in message
    assert f"data.out_dir={elsewhere}: no prepared data on " in message and "do not prepare data" in message
    assert not elsewhere.exists()  # the worker did not start preparing
