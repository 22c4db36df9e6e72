"""`sheepop eval`: loss and perplexity of a trained run on its own splits and on any file set.
A run dir without a checkpoint: tests/unit/test_eval.py."""
from __future__ import annotations

import json
import math
import random
import re
import textwrap
from pathlib import Path

import pytest

from sheepop.cli.eval import evaluate
from tests.helpers import one_error_line, sheepop, tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    r = sheepop("train", *tiny_overrides(run_dir, "trainer.max_steps=40", "trainer.eval_every=0",
                                         "trainer.eval_batches=16"))
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def _parse(out: str) -> tuple[float, float, int]:
    m = re.search(r"loss ([\d.]+), perplexity ([\d.]+) \(([\d,]+) tokens", out)
    assert m, out
    return float(m.group(1)), float(m.group(2)), int(m.group(3).replace(",", ""))


def test_val_split_loss_agrees_with_training_and_ppl_is_exp_loss(run):
    r = sheepop("eval", f"run.dir={run}", "max_tokens=20000")
    assert r.returncode == 0, r.stderr[-2000:]
    loss, ppl, tokens = _parse(r.stdout)
    assert "val split" in r.stdout and tokens >= 20000
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    # Training's last validation pass scored random windows of the same split: same ballpark.
    last_val = [m["val_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in m][-1]
    assert loss == pytest.approx(last_val, rel=0.1)
    # The model learnt something: far below the uniform distribution's ln(vocab).
    assert loss < math.log(1024) - 0.5


def test_train_split_and_deterministic(run):
    a = evaluate(str(run), split="train", max_tokens=4096)
    b = evaluate(str(run), split="train", max_tokens=4096, batch_size=3)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # same windows whatever the batching
    assert a["tokens"] == 4096 and a["windows"] == 32


def test_file_set_is_tokenized_with_the_runs_tokenizer(run, tmp_path):
    """Python source (what the model saw) scores better than random letters."""
    code = tmp_path / "code"
    code.mkdir()
    # A stable, clean ASCII source file, so the curation's normalisation leaves it unchanged.
    (code / "a.py").write_text(Path(textwrap.__file__).read_text())
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = random.Random(0)
    lines = ("".join(rng.choice("qxzjvkw ") for _ in range(60)) for _ in range(500))
    (noise / "n.txt").write_text("\n".join(lines) + "\n")  # lines: the curation filters keep it
    r = sheepop("eval", f"run.dir={run}", "data=files", f"data.paths=[{code}]")
    assert r.returncode == 0, r.stderr[-2000:]
    code_loss, _, code_tokens = _parse(r.stdout)
    r = sheepop("eval", f"run.dir={run}", "data=files", f"data.paths=[{noise}]", "max_tokens=5000")
    assert r.returncode == 0, r.stderr[-2000:]
    noise_loss, _, _ = _parse(r.stdout)
    assert code_loss < noise_loss - 0.5
    # Every token of the file was scored (up to the last partial window), with the run's tokenizer.
    from sheepop.data.tokenizer import load

    tok = load(run / "tokenizer.json")
    n = len(tok.encode((code / "a.py").read_text()).ids) + 1  # + <|endoftext|>
    assert n - 128 < code_tokens <= n


@pytest.mark.parametrize("args, needle", [
    (["split=test"], "split=test; valid: train, val"),
    (["bogus=1"], "unknown option 'bogus'"),
    (["data=nope"], "data=nope: no such data preset"),
])
def test_bad_input_is_one_line(run, args, needle):
    r = sheepop("eval", f"run.dir={run}", *args)
    assert needle in one_error_line(r)


def test_lm_eval_task_on_the_run(run):
    """`tasks=`: lm-evaluation-harness on the shipped python_mc task, offline; a table and a JSON."""
    pytest.importorskip("lm_eval")
    r = sheepop("eval", f"run.dir={run}", "tasks=python_mc", "limit=6", "batch_size=4",
                env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^python_mc\s+acc\s+[01]\.\d{4}\s+\d\.\d{4}$", r.stdout, re.M), r.stdout
    out = run / "eval" / "lm_eval_python_mc.json"
    assert str(out) in r.stdout
    rec = json.loads(out.read_text())
    assert rec["limit"] == 6 and rec["tasks"] == ["python_mc"]
    [row] = rec["table"]
    assert row["metric"] == "acc" and 0.0 <= row["value"] <= 1.0
    assert rec["lm_eval"]["results"]["python_mc"]["sample_len"] == 6
    # The harness's progress bars (and the git it runs) go to the run's log, not the user's screen.
    assert "it/s" not in r.stdout + r.stderr and "it/s" in (run / "logs" / "lm_eval.log").read_text()


@pytest.mark.parametrize("args, needle", [
    (["tasks=nope"], "no such task nope; valid: python_mc"),
    (["tasks=python_mc", "split=val"], "split belong to the loss evaluation"),
    (["limit=3"], "limit go with tasks=..."),
])
def test_lm_eval_bad_input_is_one_line(run, args, needle):
    pytest.importorskip("lm_eval")
    r = sheepop("eval", f"run.dir={run}", *args, timeout=300)
    assert needle in one_error_line(r)
