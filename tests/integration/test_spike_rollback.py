"""A loss spike (debug.spike_at_step: that step's batch gets random targets) is caught, the run
rolls back to its last checkpoint, skips the spike's data and finishes exactly as a clean run that
skips the same data (trainer.skip_steps). The detector's thresholds: tests/unit/test_spike.py."""
from __future__ import annotations

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.monitor.report import write as write_report
from tests.helpers import one_error_line, sheepop, tiny_overrides

COMMON = ["trainer.max_steps=40", "trainer.save_every=10", "trainer.eval_every=0", "trainer.precision=fp32",
          "trainer.progress=false"]


def events(run, name):
    return [e for e in read_metrics(run) if e.get("event") == name]


def test_spike_rolls_back_and_matches_a_clean_run_that_skips_its_data(tmp_path):
    spiked, clean = tmp_path / "spiked", tmp_path / "clean"
    r = sheepop("train", *tiny_overrides(spiked, *COMMON, "debug.spike_at_step=30"))
    assert r.returncode == 0, r.stderr[-3000:]
    (spike,) = events(spiked, "spike")
    assert spike["step"] == 30 and spike["action"] == "rollback" and "robust SDs above the median" in spike["reason"]
    (back,) = events(spiked, "rollback")
    assert back["from_step"] == 30 and back["step"] == 20 and back["skip_steps"] == [30]

    r = sheepop("train", *tiny_overrides(clean, *COMMON, "trainer.skip_steps=[30]"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not events(clean, "spike")
    s_steps, s_loss = latest_per_step(read_metrics(spiked), "loss")
    c_steps, c_loss = latest_per_step(read_metrics(clean), "loss")
    assert s_steps == c_steps == list(range(1, 41))
    assert max(abs(a - b) for a, b in zip(s_loss, c_loss)) < 1e-4

    html, md = write_report(spiked)
    assert "rollback" in md.read_text() and "skipping steps [30]" in md.read_text()


def test_spike_with_on_spike_stop_ends_in_one_line(tmp_path):
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, *COMMON, "trainer.max_steps=26", "debug.spike_at_step=25",
                                         "trainer.on_spike=stop"))
    line = one_error_line(r)
    assert "loss spike at step 25" in line and "trainer.skip_steps=[25]" in line, line
    assert [e["step"] for e in events(run, "spike")] == [25] and not events(run, "rollback")
