"""`sheepop plan`'s memory model against real DeepSpeed engines (sheepop's own engine.build,
gloo, 2 processes). The rest of the plan (counts, FLOPs, activations, fit check): tests/unit/test_plan.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from sheepop import plan
from sheepop.config import batch_plan, compose
from sheepop.model.transformer import Transformer, num_params
from tests.helpers import free_port


def _engine_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore::FutureWarning")
    torch.set_num_threads(1)
    from sheepop.train import engine as eng
    from sheepop.train.memory import engine_bytes

    eng.init_distributed()
    try:
        # bf16 mode accumulates gradients in fp32 at stages 2-3 (auto); bf16 accumulation there too
        cases = [(p, s, "auto") for p in plan.MODES for s in (0, 1, 2, 3)] + [("bf16", s, "bf16") for s in (2, 3)]
        for precision, stage, accum in cases:
            cfg = compose(["model=tiny", f"parallelism.zero_stage={stage}", "cluster=local", f"trainer.precision={precision}",
                           f"cluster.num_workers={world}", "logger=none", "trainer.micro_batch_size=2",
                           f"trainer.grad_accum_dtype={accum}",
                           f"trainer.global_batch_size={2 * world}"])  # one micro step = one optimizer step
            torch.manual_seed(0)
            e = eng.build(Transformer(cfg.model), cfg, batch_plan(cfg, world))
            x = torch.randint(0, 1000, (2, 32))
            e.backward(e(x, x))
            after_backward = engine_bytes(e)  # gradients live now
            e.step()
            after_step = engine_bytes(e)  # AdamW's state exists from the first step
            if rank == 0:
                queue.put(((precision, stage, accum), {k: max(after_backward[k], after_step[k]) for k in after_step}))
            del e
    finally:
        eng.shutdown()


def test_memory_model_matches_deepspeed_engines_on_two_ranks():
    """Real DeepSpeed engines, ZeRO 0-3 in every precision mode: the plan's params / grads /
    optimizer bytes per rank agree with the engines' tensors within 15%."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_engine_worker, args=(2, free_port(), queue), nprocs=2, join=True)
    # Every result was put before the workers exited: the timeout only guards against a lost one.
    measured = dict(queue.get(timeout=60) for _ in range(4 * len(plan.MODES) + 2))
    model = compose(["model=tiny"]).model
    for (precision, stage, accum), got in sorted(measured.items()):
        est = plan.memory(model, stage=stage, world=2, micro=2, seq=32, precision=precision, grad_accum=accum)
        for key in ("params", "grads", "optimizer"):
            assert est[key] == pytest.approx(got[key], rel=0.15), (precision, stage, accum, key, est[key], got[key])
    measured = {(p, s): v for (p, s, a), v in measured.items() if a == "auto"}
    # The sharding is visible in the measurements themselves, not only in the model.
    n = num_params(model)
    assert measured["bf16", 0]["optimizer"] == pytest.approx(12 * n, rel=0.05)  # fp32 master + Adam m, v
    assert measured["fp32", 0]["optimizer"] == pytest.approx(8 * n, rel=0.05)  # the fp32 weights are the master
    for stage in (1, 2, 3):  # ZeRO's promise in bf16 mode: optimizer state halves on 2 ranks
        assert measured["bf16", stage]["optimizer"] <= 0.55 * measured["bf16", 0]["optimizer"]
    assert measured["bf16", 3]["params"] < 0.6 * measured["bf16", 2]["params"]
