"""trainer.eval_tasks during training: lm-evaluation-harness tasks scored on the run's own
checkpoints in a background process (sheepop.train.task_eval), without stalling the steps."""
from __future__ import annotations

import json

import pytest

from sheepop.monitor.metrics_file import read_metrics
from tests.helpers import one_error_line, sheepop, tiny_overrides

pytest.importorskip("lm_eval")


def test_tasks_are_scored_on_checkpoints_while_training_goes_on(tmp_path):
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=4", "trainer.save_every=0", "trainer.eval_every=0",
                                         "trainer.progress=false", "trainer.eval_tasks=[python_mc]",
                                         "trainer.eval_tasks_every=2", "trainer.eval_tasks_limit=6"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run)
    tasks = [row for row in rows if row.get("event") == "tasks"]
    assert [t["step"] for t in tasks] == [2, 4], [row for row in rows if "event" in row]
    for t in tasks:  # 6 two-way questions: an accuracy in sixths
        acc = t["scores"]["tasks/python_mc/acc"]
        assert 0 <= acc <= 1 and round(acc * 6, 6) == round(acc * 6), t
        saved = json.loads((run / "eval" / f"tasks_step_{t['step']:07d}.json").read_text())
        assert saved["step"] == t["step"] and saved["limit"] == 6
        assert saved["table"][0]["value"] == acc
    # Step 2's score arrived after step 3 was trained: the steps did not wait for the evaluation.
    where = {}
    for i, row in enumerate(rows):
        if row.get("event") == "tasks" and row["step"] == 2:
            where["tasks", 2] = i
        if "loss" in row and row.get("step") == 3:
            where["loss", 3] = i
    assert where["loss", 3] < where["tasks", 2], where
    # Each evaluated step saved a checkpoint (save_every=0 saves only at the end otherwise).
    assert {"step_000002", "step_000004"} <= {c.name for c in (run / "checkpoints").iterdir()}
    assert "tasks_failed" not in {row.get("event") for row in rows}
    # The report's table: a row per evaluated step.
    from sheepop.monitor.report import build, num

    section = next(s for s in build(run).sections if s.title.startswith("Downstream tasks"))
    assert section.md.splitlines()[2:] == [f"| {t['step']} | {num(t['scores']['tasks/python_mc/acc'])} |"
                                           for t in tasks], section.md
    # The harness's output stays out of the run's own output.
    assert "python_mc" not in r.stdout and (run / "logs" / "eval_tasks.log").is_file()
    # The same checkpoint and task give the same score twice: `sheepop eval` by hand agrees.
    again = sheepop("eval", f"run.dir={run / 'checkpoints' / 'step_000004'}", "tasks=python_mc", "limit=6",
                    f"out={tmp_path / 'again.json'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["table"][0]["value"] == \
        tasks[1]["scores"]["tasks/python_mc/acc"]


def test_an_unknown_task_is_one_line_before_anything_starts(tmp_path):
    r = sheepop("train", *tiny_overrides(tmp_path / "run", "trainer.eval_tasks=[nope]", "trainer.eval_tasks_every=5"))
    assert r.returncode != 0
    assert "trainer.eval_tasks=['nope']: no such task nope; valid: python_mc" in one_error_line(r)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_plots_task_scores_against_the_checkpoint_step(tmp_path):
    """A score for step 2 arrives once W&B's step is at 5: it is logged with tasks/step=2 (W&B's own
    step never goes backwards), and the metrics file has it at step 2. W&B runs offline for real."""
    from sheepop.config import compose
    from sheepop.train.metrics import MetricsSink
    from tests.integration.test_monitor import history, offline_runs

    cfg = compose(["model=tiny", "logger=wandb", "logger.mode=offline", f"run.dir={tmp_path / 'run'}"])
    sink = MetricsSink(cfg, rank=0)
    for step in range(1, 6):
        sink.log({"step": step, "loss": 5.0 - step / 10})
    sink.task_scores({"step": 2, "scores": {"tasks/python_mc/acc": 0.5}, "seconds": 1.0})
    sink.task_scores({"step": 4, "error": "checkpoint gone"})
    sink.close()
    rows = read_metrics(tmp_path / "run")
    assert [r for r in rows if r.get("event") == "tasks"][0]["scores"] == {"tasks/python_mc/acc": 0.5}
    assert [r["reason"] for r in rows if r.get("event") == "tasks_failed"] == ["checkpoint gone"]
    (_, recs), = offline_runs(tmp_path / "run")
    logged = history(recs)
    scored = [(step, items) for step, items in logged if "tasks/python_mc/acc" in items]
    assert len(scored) == 1 and scored[0][0] == 5, logged
    assert scored[0][1]["tasks/step"] == 2 and scored[0][1]["tasks/python_mc/acc"] == 0.5
    assert [step for step, _ in logged] == sorted(step for step, _ in logged)
