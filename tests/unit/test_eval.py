"""`sheepop eval` without a trained run. On a trained run: tests/integration/test_eval.py."""
from __future__ import annotations

from tests.helpers import one_error_line, sheepop


def test_run_dir_without_checkpoint(tmp_path):
    r = sheepop("eval", f"run.dir={tmp_path}")
    assert "no checkpoint found" in one_error_line(r)
