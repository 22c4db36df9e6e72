"""The loss in chunks under ZeRO-3, where the output head is a partitioned parameter that DeepSpeed
gathers for each chunk's call of the head. The chunk arithmetic itself: tests/unit/test_model.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# One process, world of one, real DeepSpeed engines (gloo). The chunk size is lowered so that a
# model=tiny micro batch (4 x 64 tokens) is cut into 8 chunks; at the defaults it is one chunk.
CODE = """
import json, sys, torch
from sheepop.config import batch_plan, compose
from sheepop.model import transformer
from sheepop.model.transformer import Transformer
from sheepop.train import engine as eng

eng.init_distributed()
out = {}
for tied in ("true", "false"):
    for stage, chunk in ((0, None), (3, None), (3, 32)):
        transformer.LOSS_CHUNK_MIN_TOKENS = chunk or 1024
        transformer.LOSS_CHUNK_BYTES = 4 * 1024 * (chunk or 1 << 20)  # model=tiny's vocabulary: 1,024
        cfg = compose(["model=tiny", f"model.tie_embeddings={tied}", f"parallelism.zero_stage={stage}",
                       "trainer.precision=fp32", "trainer.micro_batch_size=4", "trainer.global_batch_size=4",
                       "trainer.compile=false"]
                      # every parameter partitioned, however small (DeepSpeed keeps those under 100k whole)
                      + ["parallelism.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"] * (stage == 3))
        torch.manual_seed(0)
        e = eng.build(Transformer(cfg.model), cfg, batch_plan(cfg, 1))
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x = torch.randint(0, cfg.model.vocab_size, (4, 65), generator=g)
            loss = e(x[:, :-1], x[:, 1:])
            e.backward(loss)
            e.step()
            losses.append(loss.item())
        out[f"{tied}/{stage}/{chunk}"] = losses
        del e
eng.shutdown()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def losses():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tied", ["true", "false"])
def test_zero3_losses_in_eight_chunks_equal_one_chunk_and_stage0(losses, tied):
    """Three fp32 steps: ZeRO-3 with 8 chunks a micro batch gives ZeRO-0's and one chunk's losses,
    with the head tied to the embedding and untied (a partitioned weight of its own)."""
    base = losses[f"{tied}/0/None"]
    assert base[0] > base[-1]  # it trains
    for key in (f"{tied}/3/None", f"{tied}/3/32"):
        assert max(abs(a - b) for a, b in zip(base, losses[key])) < 1e-5, (key, base, losses[key])
