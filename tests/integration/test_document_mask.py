"""data.document_mask=true through the real CLI: the training, evaluation and probe forwards take
doc_ids from the prepared data's <|endoftext|> id (the model side: tests/unit/test_document_mask.py)."""
import json
import math

from sheepop.monitor.metrics_file import read_metrics
from tests.helpers import sheepop, tiny_overrides


def test_training_with_the_document_mask_finishes_with_a_finite_loss(tmp_path):
    run = tmp_path / "r"
    r = sheepop("train", *tiny_overrides(run, "data.document_mask=true", "trainer.max_steps=5",
                                         "trainer.precision=fp32", "trainer.progress=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in read_metrics(run) if "event" not in row and "loss" in row]
    assert rows[-1]["step"] == 5 and math.isfinite(rows[-1]["loss"]) and math.isfinite(rows[-1]["val_loss"])
    assert math.isfinite(json.loads((run / "rank0.json").read_text())["probe_loss"])
