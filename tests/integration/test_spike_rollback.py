"""A loss spike (debug.spike_at_step: that step's batch gets random targets) is caught, the run
rolls back to its last checkpoint (or, on_spike=skip, drops that step's update), skips the spike's
data and finishes exactly as a clean run that skips the same data (trainer.skip_steps). The
detector's thresholds: tests/unit/test_spike.py; the update gate: tests/unit/test_update_gate.py."""
from __future__ import annotations

import pytest

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.monitor.report import write as write_report
from tests.helpers import one_error_line, sheepop, tiny_overrides

COMMON = ["trainer.max_steps=40", "trainer.save_every=10", "trainer.eval_every=0", "trainer.precision=fp32",
          "trainer.progress=false"]


def events(run, name):
    return [e for e in read_metrics(run) if e.get("event") == name]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A run that never sees step 30's data."""
    run = tmp_path_factory.mktemp("clean") / "run"
    r = sheepop("train", *tiny_overrides(run, *COMMON, "trainer.skip_steps=[30]"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not events(run, "spike")
    return run


def assert_same_losses(run, clean):
    s_steps, s_loss = latest_per_step(read_metrics(run), "loss")
    c_steps, c_loss = latest_per_step(read_metrics(clean), "loss")
    assert s_steps == c_steps == list(range(1, 41))
    assert max(abs(a - b) for a, b in zip(s_loss, c_loss)) < 1e-4


def test_spike_rolls_back_and_matches_a_clean_run_that_skips_its_data(tmp_path, clean):
    spiked = tmp_path / "spiked"
    r = sheepop("train", *tiny_overrides(spiked, *COMMON, "debug.spike_at_step=30"))
    assert r.returncode == 0, r.stderr[-3000:]
    (spike,) = events(spiked, "spike")
    assert spike["step"] == 30 and spike["action"] == "rollback" and "robust SDs above the median" in spike["reason"]
    (back,) = events(spiked, "rollback")
    assert back["from_step"] == 30 and back["step"] == 20 and back["skip_steps"] == [30]
    assert_same_losses(spiked, clean)

    html, md = write_report(spiked)
    assert "rollback" in md.read_text() and "skipping steps [30]" in md.read_text()


def test_spike_with_on_spike_stop_ends_in_one_line(tmp_path):
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, *COMMON, "trainer.max_steps=26", "debug.spike_at_step=25",
                                         "trainer.on_spike=stop"))
    line = one_error_line(r)
    assert "loss spike at step 25" in line and "trainer.skip_steps=[25]" in line, line
    assert [e["step"] for e in events(run, "spike")] == [25] and not events(run, "rollback")


def test_on_spike_skip_drops_the_update_under_zero3_and_matches_the_clean_run(tmp_path, clean):
    """The update is dropped inside DeepSpeed's ZeRO-3 step (one optimizer call per parameter
    sub-group); nothing is reloaded and nothing is retrained."""
    skipped = tmp_path / "skipped"
    r = sheepop("train", *tiny_overrides(skipped, *COMMON, "debug.spike_at_step=30", "trainer.on_spike=skip",
                                         "parallelism=zero3"))
    assert r.returncode == 0, r.stderr[-3000:]
    (spike,) = events(skipped, "spike")
    assert spike["step"] == 30 and spike["action"] == "skip" and spike["skip_steps"] == [30]
    assert not events(skipped, "rollback") and not events(skipped, "resume")
    assert_same_losses(skipped, clean)
    html, md = write_report(skipped)
    assert "skip" in md.read_text()


def test_a_rollback_can_lower_the_rate_for_a_few_steps(tmp_path):
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, *COMMON, "trainer.max_steps=26", "debug.spike_at_step=25",
                                         "trainer.rollback_lr_scale=0.5", "trainer.rollback_lr_steps=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    (back,) = events(run, "rollback")
    assert back["step"] == 20 and back["lr_scale"] == 0.5 and back["lr_scale_until"] == 23
    first, last = {}, {}  # each step's rate before the rollback and after it
    for rec in read_metrics(run):
        if "lr" in rec:
            first.setdefault(rec["step"], rec["lr"])
            last[rec["step"]] = rec["lr"]
    for step in range(21, 26):
        scale = 0.5 if step <= 23 else 1.0
        assert abs(last[step] - scale * first[step]) < 1e-12, (step, first[step], last[step])
