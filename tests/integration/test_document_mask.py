"""data.document_mask=true through the real CLI: the training, evaluation and probe forwards take
doc_ids from the prepared data's <|endoftext|> id (the model side: tests/unit/test_document_mask.py)."""
import json
import math

import pytest

from sheepop.config import compose
from sheepop.data.loader import TokenWindows, document_ids
from sheepop.data.shards import load_manifest
from sheepop.model.transformer import document_attended, flops_per_token
from sheepop.monitor.metrics_file import read_metrics
from tests.helpers import sheepop, tiny_overrides


def test_training_with_the_document_mask_finishes_with_a_finite_loss(tmp_path):
    run = tmp_path / "r"
    overrides = tiny_overrides(run, "data.document_mask=true", "trainer.max_steps=5", "trainer.precision=fp32",
                               "trainer.progress=false")
    r = sheepop("train", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in read_metrics(run) if "event" not in row and "loss" in row]
    assert rows[-1]["step"] == 5 and math.isfinite(rows[-1]["loss"]) and math.isfinite(rows[-1]["val_loss"])
    assert math.isfinite(json.loads((run / "rank0.json").read_text())["probe_loss"])

    # MFU counts the attention the mask leaves: each step's FLOPs per token, backed out of its MFU, is
    # flops_per_token over the span of the windows it trained on, below the whole-window figure.
    cfg = compose(overrides)
    manifest = load_manifest(cfg.data.out_dir)
    start = next(e for e in read_metrics(run) if e.get("event") == "start")
    micro, accum, seq = start["micro_batch"], start["grad_accum"], cfg.trainer.seq_len or cfg.model.max_seq_len
    data = TokenWindows(cfg.data.out_dir, manifest, "train", seq)
    spans = []
    for row in rows:
        windows = [data.micro_batch(cfg.run.seed, row["step"] - 1, rank=0, world=1, micro=micro, accum=accum, index=m)[0]
                   for m in range(accum)]
        span = sum(document_attended(document_ids(x, manifest["tokenizer"]["eot_id"])) for x in windows) / accum
        logged = row["mfu"] * row["peak_flops"] / row["tokens_per_sec"]
        assert logged == pytest.approx(flops_per_token(cfg.model, seq, span), rel=1e-6), row
        assert start["flops_per_token"] == flops_per_token(cfg.model, seq)
        assert logged <= start["flops_per_token"] * (1 + 1e-9)  # backed out of floats: equal within rounding
        spans.append(span)
    assert min(spans) < seq  # some step's windows held a document boundary (a single document: span = seq)
