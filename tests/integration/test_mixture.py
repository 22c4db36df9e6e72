"""data.mixture through the real CLI: two corpora prepared separately with one tokenizer, a short
run on their 0.7/0.3 mixture and its resume. metrics.jsonl holds the tokens each source gave
(exactly what the loader's (seed, step) draws say, across the resume) and a validation loss per
source; the report shows the mixture (the loader itself: tests/unit/test_mixture.py)."""
from __future__ import annotations

import json
import math
import re

from sheepop.data.loader import MixtureWindows, TokenWindows
from sheepop.data.mixture import tokens_seen
from sheepop.monitor.metrics_file import read_metrics
from sheepop.monitor.report import write as write_report
from tests.helpers import DATA_DIR, sheepop
from tests.helpers.corpora import mixture_sources

SEQ, GLOBAL = 128, 8  # model=tiny's max_seq_len; trainer=quick's global batch


def test_a_mixture_run_logs_tokens_and_val_loss_per_source_exactly_across_a_resume(tmp_path):
    prose, shout = mixture_sources(DATA_DIR / "mixture")
    run = tmp_path / "run"
    args = ["model=tiny", "trainer=quick", "cluster=process", "logger=none", f"run.dir={run}",
            f"data.mixture=[{{out_dir: {prose}, weight: 0.7}}, {{out_dir: {shout}, weight: 0.3, name: caps}}]",
            "trainer.eval_every=2", "trainer.eval_batches=2", "trainer.precision=fp32", "trainer.progress=false",
            "trainer.sample_tokens=4"]
    first = sheepop("train", *args, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "data mixture: prose 70.0% of windows" in first.stdout and "caps 30.0% of windows" in first.stdout
    second = sheepop("train", *args, "trainer.max_steps=5")  # trainer.resume=auto: continues from step 3
    assert second.returncode == 0, second.stderr[-3000:]

    rows = read_metrics(run)
    assert [r["event"] for r in rows if r.get("event") in ("start", "resume")] == ["start", "resume"]
    steps = {r["step"]: r for r in rows if "event" not in r and "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4, 5]
    mix = MixtureWindows([TokenWindows(d, json.loads((d / "manifest.json").read_text()), "train", SEQ)
                          for d in (prose, shout)], [0.7, 0.3])
    for step, r in steps.items():  # exact, and the resumed steps continue the counts
        assert [r["tokens/prose"], r["tokens/caps"]] == tokens_seen(mix, 1337, step, [], GLOBAL, SEQ), step
        assert r["tokens/prose"] + r["tokens/caps"] == r["tokens"]
    assert abs(steps[5]["tokens/prose"] / steps[5]["tokens"] - 0.7) <= 0.05  # 40 windows: within 2 of 28

    evals = [r for r in rows if "event" not in r and "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 3, 4, 5]  # step 3 ended the first run
    for r in evals:
        a, b = r["val_loss/prose"], r["val_loss/caps"]
        assert math.isfinite(a) and math.isfinite(b) and a != b
        assert abs(r["val_loss"] - (0.7 * a + 0.3 * b)) < 1e-9

    saved = json.loads((run / "checkpoints" / "step_000005" / "meta.json").read_text())
    assert saved["source_tokens"] == {"prose": steps[5]["tokens/prose"], "caps": steps[5]["tokens/caps"]}
    # `sheepop eval` scores each source's validation split and their weighted mean, as training does.
    ev = sheepop("eval", f"run.dir={run}", "split=val", "max_tokens=2000")
    assert ev.returncode == 0, ev.stderr[-2000:]
    per = {m[0]: float(m[1]) for m in re.findall(r"^  (\w+) \(\d+\.\d%\): loss (\d+\.\d+)", ev.stdout, re.M)}
    assert set(per) == {"prose", "caps"} and "  prose (70.0%)" in ev.stdout, ev.stdout
    mean = float(re.search(r"val split of the data mixture .*: loss (\d+\.\d+)", ev.stdout).group(1))
    assert abs(mean - (0.7 * per["prose"] + 0.3 * per["caps"])) < 1e-3, ev.stdout
    _, md = write_report(run)
    text = md.read_text()
    assert "## Data mixture" in text and "## Data funnel: prose" in text and "## Data funnel: caps" in text
    assert f"| caps | 30.0% | {steps[5]['tokens/caps']:,} |" in text
