"""Config composition and the CLI's one-line errors."""
import time

import pytest

from sheepop.config import batch_plan, compose, group_options, to_dict
from sheepop.errors import UserError
from tests.conftest import sheepop


def test_presets_compose_and_validate():
    for model in group_options("model"):
        cfg = to_dict(compose([f"model={model}"]))
        assert cfg["model"]["name"] == model
        assert cfg["tokenizer"]["vocab_size"] == cfg["model"]["vocab_size"]  # follows the model
    for par in group_options("parallelism"):
        assert to_dict(compose([f"parallelism={par}"]))["parallelism"]["name"] == par


def test_overrides_reach_the_dict_and_run_dir_is_resolved():
    cfg = to_dict(compose(["model=tiny", "trainer.max_steps=7", "parallelism=zero3"]))
    assert cfg["trainer"]["max_steps"] == 7 and cfg["parallelism"]["zero_stage"] == 3
    assert "${" not in cfg["run"]["dir"] and cfg["run"]["dir"].startswith("outputs/")


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_stepz=3", "valid keys in trainer: beta1"),
    ("model=nonexistent", "valid: gpt2-124m, llama-1b, llama-7b, small, tiny"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("model.d_model=97", "divisible"),
    ("cluster.num_workers=0", "cluster.num_workers=0"),
    ("trainer.precision=fp8", "valid: auto, bf16, bf16-autocast, fp32"),
    ("cluster.storage_path=s3://bucket/runs", "valid: a directory every node mounts"),
    ("trainer.warmup_steps=-5", "trainer.warmup_steps=-5 must be >= 0"),
    ("trainer.eval_batches=0", "trainer.eval_batches=0 must be >= 1"),
    ("trainer.beta2=1.5", "trainer.beta2=1.5, trainer.eps="),
    ("cluster.cpus_per_worker=-1", "cluster.cpus_per_worker=-1 must be >= 0"),
    ("trainer.resume=/does/not/exist", "no such checkpoint"),
])
def test_bad_config_is_one_user_error(override, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        compose([override])


@pytest.mark.parametrize("args", [["trainer.max_stepz=3"], ["model=nonexistent"]])
def test_cli_bad_override_one_line_fast_nonzero(args, tmp_path):
    t0 = time.time()
    r = sheepop("train", *args, f"run.dir={tmp_path}/run")
    assert time.time() - t0 < 5
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert args[0].split("=")[0] in lines[0]
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_help_lists_commands_and_config_groups():
    r = sheepop("--help")
    assert r.returncode == 0 and "train" in r.stdout and "prepare" in r.stdout and "generate" in r.stdout
    r = sheepop("train", "--help")
    assert r.returncode == 0
    assert "model: gpt2-124m, llama-1b, llama-7b, small, tiny" in r.stdout
    assert "parallelism: ddp, zero1, zero2, zero3, zero3_offload" in r.stdout


def test_global_batch_stays_fixed_across_world_sizes():
    cfg = to_dict(compose(["model=tiny", "trainer.micro_batch_size=4", "trainer.global_batch_size=16"]))
    p1, p2, p4 = (batch_plan(cfg, w) for w in (1, 2, 4))
    assert [p["grad_accum_steps"] for p in (p1, p2, p4)] == [4, 2, 1]
    assert p1["tokens_per_step"] == p2["tokens_per_step"] == p4["tokens_per_step"] == 16 * 128
    with pytest.raises(UserError, match="not a multiple"):
        compose(["model=tiny", "trainer.micro_batch_size=3", "trainer.global_batch_size=16"])


def test_raw_deepspeed_keys_merge_last_and_cannot_fight_what_sheepop_derives():
    from sheepop.train.engine import deepspeed_config

    base = ["parallelism=zero2", "cluster=local", "cluster.num_workers=2"]
    nested = to_dict(compose([*base, "parallelism.deepspeed.zero_optimization.reduce_scatter=false"]))
    ds = deepspeed_config(nested, world_size=2)
    assert ds["zero_optimization"]["reduce_scatter"] is False and ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    whole = to_dict(compose([*base, "parallelism.deepspeed={wall_clock_breakdown:true,zero_optimization:{round_robin_gradients:true}}"]))
    ds = deepspeed_config(whole, world_size=2)
    assert ds["wall_clock_breakdown"] is True  # sheepop's own value (False) loses: raw keys merge last
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["zero_optimization"]["stage"] == 2
    for raw, ours in (("train_batch_size=99", "trainer.global_batch_size"), ("fp16={enabled:true}", "trainer.precision"),
                      ("zero_optimization.stage=3", "parallelism.zero_stage")):
        with pytest.raises(UserError, match=f"set {ours} instead"):
            compose([*base, f"parallelism.deepspeed.{raw}"])
