"""`sheepop train trainer.init_from=hf:DIR` on a real run: a tiny run is trained, exported to the
Hugging Face layout and imported; the new run starts where the source ended (its step-0 val loss
is the source's last one), not at ln(vocab). The mapping and its checks: tests/unit/test_hf_import.py."""
from __future__ import annotations

import math

import yaml

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from tests.helpers import sheepop, tiny_overrides

FP32 = ["trainer.precision=fp32", "trainer.progress=false", "trainer.eval_every=0"]


def test_a_run_from_imported_weights_starts_at_their_loss(tmp_path):
    src, hf, new = tmp_path / "src", tmp_path / "hf", tmp_path / "new"
    r = sheepop("train", *tiny_overrides(src, "trainer.max_steps=20", *FP32))
    assert r.returncode == 0, r.stderr[-3000:]
    r = sheepop("export", f"run.dir={src}", "format=hf", f"out={hf}")
    assert r.returncode == 0, r.stderr[-3000:]
    # Its own data folder: prepared with the imported tokenizer.json (the same slice of the stdlib).
    r = sheepop("train", "model=tiny", "trainer=quick", "cluster=process", "logger=none", f"run.dir={new}",
                "data.max_bytes=3000000", f"data.out_dir={tmp_path / 'data'}", "trainer.max_steps=2",
                f"trainer.init_from=hf:{hf}", *FP32)
    assert r.returncode == 0, r.stderr[-3000:]
    assert yaml.safe_load((new / "config.yaml").read_text())["tokenizer"]["path"] == str(hf / "tokenizer.json")
    _, src_val = latest_per_step(read_metrics(src), "val_loss")
    steps, new_val = latest_per_step(read_metrics(new), "val_loss")
    assert steps[0] == 0 and abs(new_val[0] - src_val[-1]) < 1e-3, (src_val, new_val)
    _, src_loss = latest_per_step(read_metrics(src), "loss")
    _, loss = latest_per_step(read_metrics(new), "loss")
    # Step 1 trains on another batch than the source's last step: close to its loss, far below ln(vocab).
    assert loss[0] < math.log(1024) - 0.5 and abs(loss[0] - src_loss[-1]) < 0.25, (src_loss, loss)
