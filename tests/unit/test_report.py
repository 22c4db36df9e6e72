"""`sheepop report` on input that is not a run: one line each. On a real run: tests/integration/test_report.py."""
from __future__ import annotations

from tests.helpers import sheepop


def test_report_bad_input_is_one_line(tmp_path):
    r = sheepop("report", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such directory" in r.stderr, r.stderr
    r = sheepop("report", str(tmp_path))
    assert r.returncode == 2 and "config.yaml" in r.stderr, r.stderr
    r = sheepop("report", str(tmp_path), "logx=1")
    assert r.returncode == 2 and "valid for report: log_x, out" in r.stderr, r.stderr
