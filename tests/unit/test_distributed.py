"""The checks of a distributed run that fail from the config alone: one line, exit 2, before any
Ray instance or DeepSpeed engine starts and before anything is written. Real Ray Train workers
running real DeepSpeed: tests/integration/test_distributed.py."""
from __future__ import annotations

import pytest

from sheepop.cli import main as cli
from tests.helpers import TINY_DATA


@pytest.fixture
def nothing_may_start(monkeypatch):
    """Ray and DeepSpeed refuse to start in this test; returns the list of what tried anyway."""
    import deepspeed
    import ray

    tried: list[str] = []

    def refuse(what):
        def start(*_, **__):
            tried.append(what)
            raise AssertionError(f"{what} was called: the check came after a worker started")
        return start

    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    monkeypatch.setattr(deepspeed, "initialize", refuse("deepspeed.initialize"))
    monkeypatch.setattr(deepspeed, "init_distributed", refuse("deepspeed.init_distributed"))
    return tried


@pytest.mark.parametrize("extra, message", [
    (["cluster=local", "cluster.num_workers=0"], "cluster.num_workers=0"),
    (["cluster=local", "cluster.num_workers=2", "trainer.micro_batch_size=3", "trainer.global_batch_size=8"],
     "not a multiple"),
    (["cluster=ray", "cluster.address=127.0.0.1:1"], "nothing answers at 127.0.0.1:1"),
    (["cluster=local", "trainer.resume=/no/such/checkpoint"], "no such checkpoint"),
])
def test_bad_distributed_input_fails_before_any_worker(tmp_path, capsys, nothing_may_start, extra, message):
    run = tmp_path / "bad"
    (run / "checkpoints" / "step_000003").mkdir(parents=True)
    (run / "checkpoints" / "step_000003" / "meta.json").write_text('{"step": 3}')
    before = sorted(str(p) for p in run.rglob("*"))
    code = cli(["train", "model=tiny", "trainer=quick", "logger=none", f"run.dir={run}", *TINY_DATA,
                "trainer.max_steps=12", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert nothing_may_start == []  # no Ray, no DeepSpeed started
    assert sorted(str(p) for p in run.rglob("*")) == before  # nothing written, nothing touched
