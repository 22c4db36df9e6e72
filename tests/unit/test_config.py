"""Config composition and the CLI's one-line errors."""
import json
import sys

import pytest

from sheepop.config import BatchPlan, batch_plan, compose, group_options, to_dict
from sheepop.errors import UserError
from tests.helpers import ROOT, TINY_DATA, one_error_line, sheepop


def test_presets_compose_and_validate():
    for model in group_options("model"):
        cfg = compose([f"model={model}"])
        assert cfg.model.name == model
        assert cfg.tokenizer.vocab_size == cfg.model.vocab_size  # follows the model
    for par in group_options("parallelism"):
        assert compose([f"parallelism={par}"]).parallelism.name == par


def test_overrides_reach_the_typed_config_and_run_dir_is_resolved():
    cfg = compose(["model=tiny", "trainer.max_steps=7", "parallelism=zero3"])
    assert cfg.trainer.max_steps == 7 and cfg.parallelism.zero_stage == 3
    assert "${" not in cfg.run.dir and cfg.run.dir.startswith("outputs/")
    plain = to_dict(cfg)  # the YAML-able form: plain dicts all the way down, same values
    assert plain["trainer"]["max_steps"] == 7 and plain["run"]["dir"] == cfg.run.dir
    assert json.loads(json.dumps(plain)) == plain


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_stepz=3", "valid keys in trainer: beta1"),
    ("model=nonexistent", "valid: gpt2-124m, llama-1b, llama-7b, small, tiny"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("model.d_model=97", "divisible"),
    ("model.d_model=0", "model.d_model=0 must be >= 1"),
    ("model.n_layers=-1", "model.n_layers=-1 must be >= 1"),
    ("cluster.num_workers=0", "cluster.num_workers=0"),
    ("trainer.precision=fp8", "valid: auto, bf16, bf16-autocast, fp32"),
    ("cluster.storage_path=nosuchscheme://bucket/runs", "unknown storage scheme 'nosuchscheme://'; valid: a folder, or s3://"),
    ("run.dir=s3://bucket/run", "run.dir=s3://bucket/run: a run writes its live files to a local folder"),
    ("cluster.checkpoint_upload=later", "valid: async, sync"),
    ("trainer.warmup_steps=-5", "trainer.warmup_steps=-5 must be >= 0"),
    ("trainer.eval_batches=0", "trainer.eval_batches=0 must be >= 1"),
    ("trainer.beta2=1.5", "trainer.beta2=1.5, trainer.eps="),
    ("cluster.cpus_per_worker=-1", "cluster.cpus_per_worker=-1 must be >= 0"),
    ("trainer.resume=/does/not/exist", "no such checkpoint"),
    ("cluster.min_workers=5", "cluster.min_workers=5; valid: 1..cluster.num_workers=1"),
    ("trainer.on_spike=undo", "trainer.on_spike=undo; valid: rollback, skip, stop, warn"),
    ("trainer.on_spike=skip parallelism=zero3_offload", "trainer.on_spike=skip with parallelism.offload_optimizer=true"),
    ("trainer.rollback_lr_scale=2", "trainer.rollback_lr_scale=2.0"),
    ("trainer.grad_accum_dtype=fp16", "trainer.grad_accum_dtype=fp16; valid: auto, fp32, bf16"),
    ("trainer.grad_accum_dtype=fp32 trainer.precision=bf16 parallelism=zero1", "zero_stage=1: sheepop accumulates in fp32 at ZeRO stages 2-3"),
    ("trainer.skip_steps=[0,3]", "skip_steps=.0, 3.: steps are integers >= 1"),
    ("trainer.hang_timeout_s=-1", "trainer.hang_timeout_s=-1.0"),
    ("debug.hang_rnk=1", "valid keys in debug: hang_at_step, hang_rank, spike_at_step"),
    ("trainer.eval_tasks=[python_mc]", "python_mc.. with trainer.eval_tasks_every=0: set both"),
    ("trainer.eval_tasks_every=10", "trainer.eval_tasks=.. with trainer.eval_tasks_every=10: set both"),
    ("trainer.eval_tasks_limit=-1", "trainer.eval_tasks_limit=-1 must be >= 0"),
    ("trainer.compile=yes", "trainer.compile=yes; valid: auto, true, false"),
    ("trainer.compile_mode=fast", "trainer.compile_mode=fast; valid: default, reduce-overhead, max-autotune, "),
    # `+key=value` adds a key Hydra lets through a structured config: the same line as a typo
    ("+trainer.max_stepz=3", "unknown key 'trainer.max_stepz'; valid keys in trainer: "),
    ("+foo=1", "unknown key 'foo'; valid top-level keys: run, model"),
    ("+data.clean.x=1", "unknown key 'data.clean.x'; valid keys in data.clean: "),
    ("parallelism.reduce_bucket_size=0", "parallelism.reduce_bucket_size=0 must be >= 1"),
    ("trainer.lr=inf", "trainer.lr=inf, trainer.min_lr=.*a finite lr > 0"),
    ("trainer.sample_tokens=-1", "trainer.sample_tokens=-1 must be >= 0"),
    ("model=tiny ~trainer.lr", "^bad override .~trainer.lr.: "),  # names the bad one only
    ("trainer.precision=fp32 trainer.grad_accum_dtype=bf16", "trainer.grad_accum_dtype=bf16 with trainer.precision=fp32"),
    ("hydra.run.dir=/tmp/x", "hydra.run.dir=/tmp/x: sheepop does not use Hydra's own settings"),
    ("data=files data.paths=/tmp/src", "data.paths=/tmp/src: data.paths is a list; write data.paths="),
])
def test_bad_config_is_one_user_error(override, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        compose(override.split())


@pytest.mark.parametrize("value, on", [("true", True), ("True", True), ("false", False), ("auto", None)])
def test_trainer_compile_values_compose_and_auto_means_on_with_cuda_only(value, on):
    import torch

    from sheepop.train.compilation import enabled

    cfg = compose(["model=tiny", f"trainer.compile={value}", "trainer.compile_mode=max-autotune"])
    assert enabled(cfg.trainer.compile) == (torch.cuda.is_available() if on is None else on)


# The CLI in a child that reports, as it exits, which heavy libraries it imported.
HEAVY = ("torch", "deepspeed", "ray")
IMPORTS_REPORTED = """
import atexit, json, sys
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules))))
from sheepop.cli import main
sys.exit(main(sys.argv[2:]))
""".format(heavy=HEAVY)


@pytest.mark.parametrize("args", [["trainer.max_stepz=3"], ["model=nonexistent"]])
def test_cli_bad_override_one_line_nonzero_before_any_heavy_import(args, tmp_path):
    """A config error is answered from the config alone: one line, exit 2, nothing written, and
    neither torch, DeepSpeed nor Ray imported (what makes it fast; the time itself is bench/'s)."""
    import subprocess

    report = tmp_path / "imports.json"
    r = subprocess.run([sys.executable, "-c", IMPORTS_REPORTED, str(report), "train", *args, f"run.dir={tmp_path}/run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert args[0].split("=")[0] in lines[0]
    assert not (tmp_path / "run").exists()  # failed before writing anything
    assert json.loads(report.read_text()) == []  # no heavy import: the error came before any


@pytest.mark.parametrize("args, needle", [
    (["--info"], "'--info': not a flag of sheepop train"),
    (["-m", "model=tiny"], "'-m': not a flag of sheepop train"),
    (["--cfg", "hydra"], "--cfg hydra: sheepop train prints its own config only"),
    (["--help", "trainer.max_stepz=3"], "unknown key 'trainer.max_stepz'"),
])
def test_train_flags_it_does_not_take_are_one_line(args, needle):
    from tests.helpers import one_error_line, sheepop

    assert needle in one_error_line(sheepop("train", *args))


def test_train_help_and_cfg_job_take_overrides_on_either_side():
    from tests.helpers import sheepop

    r = sheepop("train", "model=tiny", "--help")
    assert r.returncode == 0 and "== Configuration groups ==" in r.stdout, r.stderr
    r = sheepop("train", "--cfg", "job", "model=tiny")
    assert r.returncode == 0 and "name: tiny-stdlib" in r.stdout, r.stderr


FREEZE_REPORTED = """
import atexit, gc, sys
atexit.register(lambda: print("frozen", gc.get_freeze_count()))
from sheepop.cli import main
main(["--help"])  # a call from Python code: its caller goes on, so nothing is frozen
print("after a call", gc.get_freeze_count())
sys.argv = ["sheepop", "--help"]
sys.exit(main())  # the program itself
"""


def test_the_program_freezes_its_objects_before_exit_and_a_call_from_code_does_not():
    """What spares each `sheepop` exit CPython's full collections over torch's, DeepSpeed's and
    Ray's objects (sheepop.cli._before_exit; the time it saves is bench/startup.py's `exit`)."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", FREEZE_REPORTED], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    counts = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines() if line.startswith(("after", "frozen")))
    assert int(counts["after a call"]) == 0
    assert int(counts["frozen"]) > 1_000


def test_a_rank_imports_no_curation_library():
    """A rank imports the training loop, which reads prepared data (sheepop.data.shards) but never
    curates: datasketch and the scipy it pulls in (~0.3 s of every rank's start) stay out."""
    import subprocess

    code = "import sys, sheepop.train.loop; print(sorted({'datasketch', 'scipy'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_help_lists_commands_and_config_groups():
    r = sheepop("--help")
    assert r.returncode == 0 and "train" in r.stdout and "prepare" in r.stdout and "generate" in r.stdout
    bare = sheepop()  # no command at all: the same usage, but as an error
    assert bare.returncode == 2 and "train" in bare.stderr and not bare.stdout
    r = sheepop("train", "--help")
    assert r.returncode == 0
    assert "model: gpt2-124m, llama-1b, llama-7b, small, tiny" in r.stdout
    assert "parallelism: ddp, zero1, zero2, zero3, zero3_offload" in r.stdout


def test_global_batch_stays_fixed_across_world_sizes():
    cfg = compose(["model=tiny", "trainer.micro_batch_size=4", "trainer.global_batch_size=16"])
    p1, p2, p4 = (batch_plan(cfg, w) for w in (1, 2, 4))
    assert all(isinstance(p, BatchPlan) for p in (p1, p2, p4))
    assert [p.grad_accum_steps for p in (p1, p2, p4)] == [4, 2, 1]
    assert [p.world_size for p in (p1, p2, p4)] == [1, 2, 4]
    assert {(p.micro_batch_size, p.global_batch_size, p.seq_len) for p in (p1, p2, p4)} == {(4, 16, 128)}
    assert p1.tokens_per_step == p2.tokens_per_step == p4.tokens_per_step == 16 * 128
    with pytest.raises(UserError, match="not a multiple"):
        compose(["model=tiny", "trainer.micro_batch_size=3", "trainer.global_batch_size=16"])


def test_an_elastic_plan_has_a_batch_plan_for_every_world_it_may_shrink_to(tmp_path):
    from sheepop.driver.runner import make_plan, preflight

    cfg = compose(["model=tiny", "cluster.num_workers=4", "cluster.min_workers=2", "trainer.micro_batch_size=2",
                   "trainer.global_batch_size=24", f"run.dir={tmp_path / 'run'}", "cluster.num_cpus=8"])
    plan = make_plan(cfg, None, manifest={})
    assert {w: plan.batch_for(w).grad_accum_steps for w in (2, 3, 4)} == {2: 6, 3: 4, 4: 3}
    assert {plan.batch_for(w).global_batch_size for w in (2, 3, 4)} == {24}
    with pytest.raises(UserError, match="world of 1, the run plan was made for 2 or 3 or 4"):
        plan.batch_for(1)
    # 16 sequences cannot be split over 3 workers of micro 2: the driver says so before anything starts.
    bad = compose(["model=tiny", "cluster.num_workers=4", "cluster.min_workers=2", "trainer.micro_batch_size=2",
                   "trainer.global_batch_size=16", f"run.dir={tmp_path / 'run'}", "cluster.num_cpus=8"])
    with pytest.raises(UserError, match=r"multiple of 6 \(an elastic run may shrink to 3 worker\(s\): cluster.min_workers=2\)"):
        preflight(bad)


def test_raw_deepspeed_keys_merge_last_and_cannot_fight_what_sheepop_derives():
    from sheepop.train.engine import deepspeed_config

    base = ["parallelism=zero2", "cluster=local", "cluster.num_workers=2"]
    nested = compose([*base, "parallelism.deepspeed.zero_optimization.reduce_scatter=false"])
    ds = deepspeed_config(nested, batch_plan(nested, 2))
    assert ds["zero_optimization"]["reduce_scatter"] is False and ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    whole = compose([*base, "parallelism.deepspeed={wall_clock_breakdown:true,zero_optimization:{round_robin_gradients:true}}"])
    ds = deepspeed_config(whole, batch_plan(whole, 2))
    assert ds["wall_clock_breakdown"] is True  # sheepop's own value (False) loses: raw keys merge last
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["zero_optimization"]["stage"] == 2
    for raw, ours in (("train_batch_size=99", "trainer.global_batch_size"), ("fp16={enabled:true}", "trainer.precision"),
                      ("zero_optimization.stage=3", "parallelism.zero_stage")):
        with pytest.raises(UserError, match=f"set {ours} instead"):
            compose([*base, f"parallelism.deepspeed.{raw}"])


def test_raw_deepspeed_keys_deepspeed_would_not_read_are_refused_before_any_worker(tmp_path):
    """DeepSpeed 0.19 ignores a top-level key it does not know, and its pydantic sections refuse an
    unknown nested key only when a rank builds its engine: the driver runs DeepSpeed's own parser."""
    from sheepop.driver.runner import preflight

    base = ["model=tiny", "cluster=process", f"run.dir={tmp_path / 'run'}", *TINY_DATA]
    for raw, line in (("{wall_clok_breakdown: true}", "parallelism.deepspeed.wall_clok_breakdown: not a key DeepSpeed"),
                      ("{zero_optimization: {overlap_com: true}}",
                       "parallelism.deepspeed.zero_optimization.overlap_com: not a key DeepSpeed .* reads there"),
                      ("{zero_optimization: {reduce_bucket_size: -3}}",
                       "parallelism.deepspeed.zero_optimization.reduce_bucket_size: Input should be greater than 0")):
        with pytest.raises(UserError, match=line):
            preflight(compose([*base, "parallelism=zero2", f"parallelism.deepspeed={raw}"]))
    # keys DeepSpeed reads pass, at the top level and nested
    preflight(compose([*base, "parallelism=zero2", "parallelism.deepspeed={prescale_gradients: true, "
                       "zero_optimization: {round_robin_gradients: true}, flops_profiler: {enabled: false}}"]))
    cli = [*base[:2], f"run.dir={tmp_path / 'cli'}", *TINY_DATA]
    line = one_error_line(sheepop("train", *cli, "parallelism.deepspeed={wall_clok_breakdown: true}"))
    assert "parallelism.deepspeed.wall_clok_breakdown" in line and not (tmp_path / "cli").exists()


def test_storage_uris_are_accepted():
    cfg = compose(["cluster.storage_path=s3://bucket/runs", "data.out_dir=gs://bucket/data/x",
                   "trainer.resume=gs://bucket/runs/a/checkpoints/step_000004"])  # the driver checks it (storage)
    assert cfg.cluster.storage_path == "s3://bucket/runs" and cfg.data.out_dir == "gs://bucket/data/x"
    assert cfg.trainer.resume == "gs://bucket/runs/a/checkpoints/step_000004"


@pytest.mark.parametrize("mode, setting, stage, expected", [
    ("bf16", "auto", 0, "bf16"), ("bf16", "auto", 1, "bf16"), ("bf16", "auto", 2, "fp32"), ("bf16", "auto", 3, "fp32"),
    ("bf16", "bf16", 2, "bf16"), ("bf16", "fp32", 2, "fp32"),
    ("fp32", "bf16", 2, "fp32"), ("bf16-autocast", "auto", 0, "fp32"),  # fp32 weights: fp32 gradients
])
def test_gradients_accumulate_in_fp32_in_bf16_mode_where_deepspeed_can(mode, setting, stage, expected):
    from sheepop.config import grad_accum_dtype

    assert grad_accum_dtype(mode, setting, stage) == expected


def test_bf16_mode_sends_the_accumulation_dtype_to_deepspeed():
    from sheepop.train.engine import deepspeed_config

    for stage, setting, expected in ((2, "auto", "fp32"), (2, "bf16", "bf16"), (1, "auto", "bf16"), (0, "auto", "bf16")):
        cfg = compose(["model=tiny", "trainer.precision=bf16", f"parallelism.zero_stage={stage}",
                       f"trainer.grad_accum_dtype={setting}"])
        assert deepspeed_config(cfg, batch_plan(cfg, 1))["data_types"] == {"grad_accum_dtype": expected}
    fp32 = compose(["model=tiny", "trainer.precision=fp32"])
    assert "data_types" not in deepspeed_config(fp32, batch_plan(fp32, 1))
    # The defaults (parallelism=zero2) accumulate bf16 gradients in fp32 (#13)
    default = compose(["model=tiny", "trainer.precision=bf16"])
    assert default.parallelism.name == "zero2"
    assert deepspeed_config(default, batch_plan(default, 1))["data_types"] == {"grad_accum_dtype": "fp32"}
