"""trainer.fused_optimizer: the engine's AdamW is torch's fused kernel (8x torch's CPU default on
the step here, bench/optimizer_step.py), at ZeRO stages 0-3, and trains as the default one does."""
import json
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = r'''
import json, sys, torch
from sheepop.config import batch_plan, compose
from sheepop.model.transformer import Transformer
from sheepop.train import engine as eng

eng.init_distributed()
out = {}
for stage in ("ddp", "zero2", "zero3"):
    for fused in ("true", "false"):
        cfg = compose(["model=tiny", "cluster=process", f"parallelism={stage}", "trainer.precision=fp32",
                       "trainer.global_batch_size=0", "trainer.micro_batch_size=2", f"trainer.fused_optimizer={fused}"])
        torch.manual_seed(0)
        engine = eng.build(Transformer(cfg.model), cfg, batch_plan(cfg, 1))
        adamw = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client optimizer
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            x = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=g)
            loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[f"{stage}/{fused}"] = {"fused": adamw.defaults["fused"], "kind": type(adamw).__name__, "losses": losses}
eng.shutdown()  # without it the process may abort at exit (sheepop.compat.let_gloo_threads_finish)
print(json.dumps(out))
'''


def test_fused_adamw_at_every_stage_trains_like_the_default():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for stage in ("ddp", "zero2", "zero3"):
        on, off = out[f"{stage}/true"], out[f"{stage}/false"]
        assert on["kind"] == off["kind"] == "GatedAdamW"
        assert on["fused"] is True and not off["fused"], (stage, on, off)
        assert max(abs(a - b) for a, b in zip(on["losses"], off["losses"])) < 1e-5, (stage, on, off)
        assert on["losses"][-1] < on["losses"][0]  # it does train
