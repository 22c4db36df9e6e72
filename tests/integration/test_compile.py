"""trainer.compile=true (torch.compile of each block's training forward) through the real CLI and real
DeepSpeed engines: it trains like eager at ZeRO-2 and ZeRO-3, leaves checkpoints' keys as they were,
resumes exactly, and a restart of the run reuses the run's Inductor cache.

Compiling on 2 CPU cores is slow (~40 s per cold compile of the tiny model), so one module fixture
makes four runs of 20 steps, fp32 (bf16's rounding differs between fused and unfused kernels): eager
and compiled at ZeRO-2 and ZeRO-3, then restarts the compiled ZeRO-3 run from its step-10 checkpoint
(its step-20 checkpoint moved aside) and runs steps 11-20 again: the resume of a compiled run.
"""
import json
import shutil

import pytest
import torch

from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.train.checkpoint import consolidated_state_dict
from tests.helpers import sheepop, tiny_overrides

STEPS = 20
HALF = STEPS // 2
COMMON = ["trainer.precision=fp32", "trainer.eval_every=0", "trainer.progress=false", f"trainer.save_every={HALF}",
          f"trainer.max_steps={STEPS}"]


def _train(run, *extra):
    r = sheepop("train", *tiny_overrides(run, *COMMON, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _rows(run) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    out = {"root": root, "stderr": {}}
    for name, extra in (("z2_eager", ["parallelism=zero2", "trainer.compile=false"]),
                        ("z2_compiled", ["parallelism=zero2", "trainer.compile=true"]),
                        ("z3_eager", ["parallelism=zero3", "trainer.compile=false"]),
                        ("z3_compiled", ["parallelism=zero3", "trainer.compile=true"])):
        out["stderr"][name] = _train(root / name, *extra).stderr
    run = root / "z3_compiled"
    out["straight"] = _rows(run)  # the uninterrupted compiled run
    # A restart of the same run from step 10 (trainer.resume=auto finds step_000010 now).
    shutil.move(run / "checkpoints" / f"step_{STEPS:06d}", root / "z3_compiled_step20")
    out["stderr"]["z3_resumed"] = _train(run, "parallelism=zero3", "trainer.compile=true").stderr
    return out


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_compiled_losses_match_eager(runs, stage):
    eager_steps, eager = latest_per_step(read_metrics(runs["root"] / f"{stage}_eager"), "loss")
    steps, compiled = latest_per_step(read_metrics(runs["root"] / f"{stage}_compiled"), "loss")
    assert eager_steps == steps == list(range(1, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-3, (eager, compiled)
    starts = [e for e in read_metrics(runs["root"] / f"{stage}_compiled") if e.get("event") in ("start", "resume")]
    assert starts and all(e["precision"] == "fp32" for e in starts)
    # dynamo/inductor say nothing on the user's screen (no recompile-limit warnings: nothing recompiles)
    for name, err in runs["stderr"].items():
        assert "torch._dynamo" not in err and "torch._inductor" not in err and "recompile" not in err, (name, err)


def test_checkpoint_keys_unchanged_with_compile(runs):
    """No `_orig_mod.` (or any other wrapper prefix) in the module's state dict nor in the consolidated
    weights export and generate use: the same keys as an eager run's, at both stages."""
    for stage in ("z2", "z3"):
        eager = runs["root"] / f"{stage}_eager" / "checkpoints" / f"step_{STEPS:06d}"
        compiled = runs["root"] / f"{stage}_compiled" / "checkpoints" / f"step_{STEPS:06d}"
        e, c = consolidated_state_dict(eager), consolidated_state_dict(compiled)
        assert sorted(c) == sorted(e) and not any("_orig_mod" in k for k in c), sorted(c)
        assert max((c[k] - e[k]).abs().max().item() for k in e) < 1e-3  # and the same weights, near enough
        (states,) = (compiled / "ds").glob("*model_states.pt")
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        assert not any("_orig_mod" in k for k in module) and set(module) <= set(e), sorted(module)
    # generate loads the compiled run's checkpoint into an eager model
    g = sheepop("generate", f"run.dir={runs['root'] / 'z3_compiled'}", "prompt=def ", "max_new_tokens=8",
                "greedy=true")
    assert g.returncode == 0 and g.stdout.startswith("def "), g.stderr[-3000:]


def test_resume_of_compiled_run_matches_uninterrupted_and_reuses_inductor_cache(runs):
    """The compiled ZeRO-3 run restarted from its step-10 checkpoint repeats steps 11-20 of the
    uninterrupted compiled run (losses and final weights), and the restart loads the run's Inductor
    cache (run.dir/cache/inductor) instead of compiling cold."""
    run = runs["root"] / "z3_compiled"
    assert [e["event"] for e in read_metrics(run) if e.get("event") in ("start", "resume")] == ["start", "resume"]
    straight = runs["straight"]
    resumed = [r for r in _rows(run) if r["attempt"] == 1]
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(HALF + 1, STEPS + 1))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(straight[HALF:], resumed)) < 1e-3, (straight, resumed)
    again = consolidated_state_dict(run / "checkpoints" / f"step_{STEPS:06d}")
    first = consolidated_state_dict(runs["root"] / "z3_compiled_step20")
    assert max((again[k] - first[k]).abs().max().item() for k in first) < 1e-3

    cache = run / "cache" / "inductor"
    assert any((cache / "fxgraph").rglob("*")), "no FX graph cache entries in run.dir/cache/inductor"
    cold, warm = straight[0]["step_time"], resumed[0]["step_time"]  # the first step of each compiles
    assert warm < 0.75 * cold, (warm, cold)
    assert json.loads((run / "checkpoints" / f"step_{STEPS:06d}" / "meta.json").read_text())["step"] == STEPS
