"""End-to-end training through the real CLI (real DeepSpeed on gloo, real tokenizers)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sheepop.cpu_allocator import TUNABLE, decide, glibc_version, thp_mode
from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.train.stop import STOPPED_EXIT_CODE
from tests.helpers import ROOT, free_port, one_error_line, sheepop, tiny_overrides
FP32 = ["trainer.precision=fp32", "trainer.progress=false"]


# The malloc `sheepop train` runs with on this host (sheepop.cpu_allocator): sheepop's settings, or
# the environment's own where it names a malloc setting.
DECISION, TUNABLES = decide(os.environ.get("GLIBC_TUNABLES", ""), glibc_version(), thp_mode())
HUGEPAGES = f"{TUNABLE}=1" in (TUNABLES or os.environ.get("GLIBC_TUNABLES", "")).split(":")
HEAP = DECISION == "keep-freed"
MALLOC = (DECISION, TUNABLES)


def test_default_cluster_run_writes_every_artefact(tmp_path):
    """The issue's acceptance command, on the default cluster (a local Ray instance)."""
    run = tmp_path / "r"
    r = sheepop("train", "model=tiny", "trainer.max_steps=30", f"run.dir={run}", "logger.mode=offline",
                "data.max_bytes=3000000", f"data.out_dir={tmp_path.parent}/stdlib-3mb-v1024-default",
                "trainer.profile=true", "trainer.profile_start=2", "trainer.profile_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.json", "loss.png"):
        assert (run / name).is_file(), name
    # trainer.profile: a Chrome/Perfetto trace of steps 3-4 (after one warm-up step; the profiler counts
    # from 0), the model's ops and the optimizer step in it, written once step 4 is done
    (trace,) = (run / "profile").glob("rank0.*.pt.trace.json")
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3"}
    assert "aten::scaled_dot_product_attention" in names and "Optimizer.step#GatedAdamW.step" in names
    assert [e["step"] for e in read_metrics(run) if e.get("event") == "profile"] == [4]
    ckpts = list((run / "checkpoints").glob("step_*/meta.json"))
    assert [json.loads(p.read_text())["step"] for p in ckpts] == [30]
    rows = [r for r in read_metrics(run) if "event" not in r and "loss" in r]
    assert len(rows) == 30
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec"):
        assert all(key in row for row in rows), key
    assert any("val_loss" in row and "val_ppl" in row for row in rows)
    assert "api_key" not in (run / "config.yaml").read_text().lower()
    assert "Ray dashboard" not in r.stdout  # cluster.dashboard=false by default (its own test: test_distributed)
    # The start-up timeline (sheepop.startup, bench/startup.py): the driver's phases, Ray's, the rank's.
    start = next(e for e in read_metrics(run) if e.get("event") == "start")
    startup = start["startup"]  # seconds since launch, in time order; a Ray worker's process may predate "ray"
    assert [k for k in startup if k != "worker_process"] == ["launch", "config", "compose", "preflight", "data", "plan",
                                                             "ray", "worker", "distributed", "data_verified",
                                                             "engine"], startup
    assert startup["launch"] == 0 and startup["worker_process"] < startup["worker"]
    launched = start["time"] - startup["engine"]  # the start event follows the engine
    assert rows[0]["time"] - rows[0]["step_time"] - launched >= startup["engine"]  # the first step comes after
    # The Ray worker trains on all of this machine's CPUs (Ray's own default would be one thread).
    assert start["cpu_threads"] == len(os.sched_getaffinity(0)), start
    # sheepop train ran itself again with huge pages, which the Ray worker inherited, and the worker keeps freed memory
    assert (start["malloc_hugepages"], start["malloc_heap_only"]) == (HUGEPAGES, HEAP), (start, MALLOC)
    # The Ray started for the run holds the run's actors and no more (compat.ray_torch_trainer,
    # RAY_LOCAL_TRAIN_ENV): each other one would be a Python process started before the first step.
    actors = {line.split(":actor_name:")[1].strip() for f in (run / "logs" / "ray").glob("worker-*.out")
              for line in f.read_text(errors="replace").splitlines() if ":actor_name:" in line}
    assert actors == {"TrainController", "SynchronizationActor", "RayTrainWorker", "StopFlag"}, actors


def test_tiny_model_learns(tmp_path):
    run = tmp_path / "learn"
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=200", "trainer.eval_every=100", "trainer.progress=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    # cluster=process: DeepSpeed's warnings go to the rank's log, not to the terminal sheepop's lines use
    assert "[WARNING]" not in r.stdout + r.stderr and "untested optimizer" in (run / "logs" / "rank0.log").read_text()
    steps, val = latest_per_step(read_metrics(run), "val_loss")
    assert steps[0] == 0 and steps[-1] == 200
    assert val[-1] < 0.8 * val[0], val
    start = next(e for e in read_metrics(run) if e.get("event") == "start")
    # cluster=process: the CLI's own process
    assert (start["malloc_hugepages"], start["malloc_heap_only"]) == (HUGEPAGES, HEAP), (start, MALLOC)
    # The sample printed at the end comes from the trained checkpoint.
    assert (run / "sample.txt").read_text().startswith("def ")

    g1 = sheepop("generate", f"run.dir={run}", "prompt=def ", "max_new_tokens=20", "greedy=true")
    g2 = sheepop("generate", f"run.dir={run}", "prompt=def ", "max_new_tokens=20", "greedy=true", "no_cache=true")
    assert g1.returncode == 0, g1.stderr
    assert g1.stdout.startswith("def ") and len(g1.stdout) > 8
    assert g1.stdout == g2.stdout  # KV cache or not, greedy picks the same tokens

    # export format=pt: consolidated fp32 weights that load with plain torch, no DeepSpeed import.
    out = tmp_path / "export" / "model.pt"
    r = sheepop("export", f"run.dir={run}", "format=pt", f"out={out}")
    assert r.returncode == 0 and out.is_file() and (out.parent / "tokenizer.json").is_file(), r.stderr
    g3 = sheepop("generate", f"run.dir={out}", "prompt=def ", "max_new_tokens=20", "greedy=true")
    assert g3.returncode == 0 and g3.stdout == g1.stdout, g3.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys; from sheepop.train.checkpoint import load_model; "
                            f"load_model({str(out)!r}); print('deepspeed' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert probe.stdout.strip() == "False", probe.stderr


def _interrupt_at(run: Path, args: list[str], step: int) -> subprocess.CompletedProcess:
    """Start a run, press Ctrl-C once it has logged `step`, wait for it to exit."""
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train", *args], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # a hang guard: the step comes within a minute normally
    pressed = False
    while time.monotonic() < deadline and p.poll() is None:
        rows = [r for r in read_metrics(run) if "loss" in r]
        if rows and rows[-1]["step"] >= step:
            p.send_signal(signal.SIGINT)
            pressed = True
            break
        time.sleep(0.05)
    if not pressed:
        p.kill()
    out, err = p.communicate(timeout=600)
    assert pressed, f"the run never logged step {step}: {err[-3000:]}"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_ctrl_c_saves_and_resume_reproduces_uninterrupted_run(tmp_path):
    common = ["trainer.max_steps=60", "trainer.save_every=0", "trainer.eval_every=0", *FP32]
    straight = tmp_path / "straight"
    r = sheepop("train", *tiny_overrides(straight, *common))
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "interrupted"
    r = _interrupt_at(run, tiny_overrides(run, *common), step=8)
    assert r.returncode == STOPPED_EXIT_CODE, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    stop = [e for e in read_metrics(run) if e.get("event") == "stop"]
    assert len(stop) == 1 and 8 <= stop[0]["step"] < 60
    ckpt = run / "checkpoints" / f"step_{stop[0]['step']:06d}"
    assert json.loads((ckpt / "meta.json").read_text())["step"] == stop[0]["step"]

    # trainer.resume=auto, from a shell that belongs to someone else's torchrun world (rank 1 of 2):
    # cluster=process still trains as a world of one, not as that world's rank 1 waiting for rank 0
    foreign = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
    r = sheepop("train", *tiny_overrides(run, *common), env=foreign)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(e.get("event") == "resume" for e in read_metrics(run))
    s_steps, s_loss = latest_per_step(read_metrics(straight), "loss")
    i_steps, i_loss = latest_per_step(read_metrics(run), "loss")
    assert s_steps == i_steps == list(range(1, 61))
    diff = max(abs(a - b) for a, b in zip(s_loss, i_loss))
    assert diff < 1e-4, diff


def test_a_second_start_in_a_run_dir_in_use_is_refused_and_the_stopped_run_says_so(tmp_path):
    """One `sheepop train` per run.dir: a second start there is one line and changes nothing. The
    first, stopped, says where and why; its sample is printed as text (brackets are not markup)."""
    run = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train",
                          *tiny_overrides(run, "trainer.max_steps=1000000", "trainer.eval_every=0",
                                          "trainer.save_every=0", "trainer.sample_prompt='x[i] = d[/key] '")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any("loss" in r for r in read_metrics(run)) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        config = (run / "config.yaml").read_text()
        r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=1000000", "trainer.lr=0.01"))
        assert f"run.dir={run} is in use by a running `sheepop train` (pid " in one_error_line(r)
        assert (run / "config.yaml").read_text() == config
        (run / "STOP").write_text("")
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == STOPPED_EXIT_CODE, err[-3000:]
    assert "stopped at step" in out and "(run.dir/STOP exists)" in out, out
    assert "x[i] = d[/key] " in out, out


def test_sigterm_before_training_ends_start_up_with_a_line(tmp_path):
    """A SIGTERM while the data is still being prepared (no step to save): one line, exit 143,
    not a silent death (the preparation's work folder stays, to be resumed)."""
    run = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train", "model=tiny", "trainer=quick", "cluster=process",
                          "logger=none", f"run.dir={run}", "data.max_bytes=3000000",
                          f"data.out_dir={tmp_path / 'fresh-data'}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("sheepop run → "), p.stderr.read()  # preparing from here on
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 143 and err.strip() == ("sheepop train: SIGTERM received; stopped (no step was being "
                                                   "trained, nothing to save)"), (p.returncode, err[-3000:])
    assert not (run / "config.yaml").exists() and not (tmp_path / "fresh-data" / "manifest.json").exists()


def test_refused_resumes_leave_existing_checkpoints_untouched(tmp_path):
    run = tmp_path / "r"
    assert sheepop("train", *tiny_overrides(run, "trainer.max_steps=3", "trainer.save_every=2", *FP32)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    # Back to an older checkpoint of the same run: its re-saves would overwrite step 3, and a
    # resume=auto after a failure would pick the abandoned step 3. A branch goes to a new run.dir.
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", f"trainer.resume={run}/checkpoints/step_000002"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "newer checkpoints (step_000003)" in r.stderr and "a new run.dir or run.name" in r.stderr
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", "trainer.resume=never"))
    assert r.returncode == 2 and "already has checkpoints" in r.stderr and "Traceback" not in r.stderr
    # Another model shape: one line naming the setting, before any DeepSpeed load fails on size mismatches.
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", "model.d_model=128"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.d_model=128 (checkpoint: 96)" in r.stderr
    # A ZeRO stage DeepSpeed cannot convert this stage-2 checkpoint to: one line, before any worker.
    for zero in ("zero3", "ddp"):
        r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", f"parallelism={zero}"))
        assert "was saved at ZeRO stage 2, which DeepSpeed cannot convert to stage" in one_error_line(r)
    # A resume named by a file; a start whose inputs cannot be read: one line, and the run's
    # config.yaml stays the one of the run that wrote the checkpoints.
    config = (run / "config.yaml").read_text()
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", f"trainer.resume={run}/checkpoints/step_000003/meta.json"))
    assert "a file, not a checkpoint folder" in one_error_line(r)
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=6", "trainer.lr=0.5", "tokenizer.path=/nonexistent.json"))
    assert "tokenizer.path=/nonexistent.json: no such file" in one_error_line(r)
    assert (run / "config.yaml").read_text() == config
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before


@pytest.mark.parametrize("zero", ["ddp", "zero1", "zero2"])
def test_bf16_checkpoint_holds_fp32_master_and_resumes_exactly(tmp_path, zero):
    """precision=bf16 is DeepSpeed's bf16 mode: bf16 weights in the module, their fp32 master in
    the optimizer. A checkpoint must carry the master: consolidated weights are fp32 (not bf16-
    rounded) and round to the module's bf16 weights, and a resume from step 3 ends with exactly
    the weights and losses of the run that never stopped. (zero2: gradients accumulate in fp32.)"""
    import torch

    from sheepop.train.checkpoint import consolidated_state_dict

    common = ["trainer.precision=bf16", f"parallelism={zero}", "trainer.max_steps=6", "trainer.save_every=3",
              "trainer.eval_every=0", "trainer.progress=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = sheepop("train", *tiny_overrides(straight, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    start = next(e for e in read_metrics(straight) if e.get("event") == "start")
    assert start["precision"] == "bf16"
    ckpt = straight / "checkpoints" / "step_000006"
    weights = consolidated_state_dict(ckpt)
    module = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for name, w in weights.items():
        assert module[name].dtype == torch.bfloat16 and w.dtype == torch.float32, name
        assert torch.equal(w.bfloat16(), module[name]), name  # the master rounds to the module's weights
    matrix = weights["layers.0.attn.wq.weight"]
    assert (matrix != matrix.bfloat16().float()).float().mean() > 0.5  # ... and keeps fp32 bits

    r = sheepop("train", *tiny_overrides(resumed, *common, f"trainer.resume={straight}/checkpoints/step_000003"))
    assert r.returncode == 0, r.stderr[-3000:]
    s_steps, s_loss = latest_per_step(read_metrics(straight), "loss")
    r_steps, r_loss = latest_per_step(read_metrics(resumed), "loss")
    assert r_steps == [4, 5, 6] and s_steps[3:] == r_steps
    assert max(abs(a - b) for a, b in zip(s_loss[3:], r_loss)) < 1e-4
    again = consolidated_state_dict(resumed / "checkpoints" / "step_000006")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_bf16_autocast_mode_trains_with_fp32_weights(tmp_path):
    """precision=bf16-autocast: fp32 weights in the module, matmuls under torch.autocast."""
    import torch

    run = tmp_path / "amp"
    r = sheepop("train", *tiny_overrides(run, "trainer.precision=bf16-autocast", "trainer.max_steps=8",
                                         "trainer.eval_every=0", "trainer.progress=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    start = next(e for e in read_metrics(run) if e.get("event") == "start")
    steps, loss = latest_per_step(read_metrics(run), "loss")
    assert start["precision"] == "bf16-autocast" and steps == list(range(1, 9)) and loss[-1] < loss[0]
    module = torch.load(run / "checkpoints" / "step_000008" / "ds" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert {t.dtype for t in module.values()} == {torch.float32}


def test_activation_checkpointing_trains_like_without_it_on_zero3_and_zero2(tmp_path):
    """model.activation_checkpointing through real DeepSpeed engines: at ZeRO-3 a recompute in
    backward gathers its block's sharded weights again. full (ZeRO-3) and selective (ZeRO-2) log
    the losses of the run without it (fp32, one rank: the stages train alike)."""
    from sheepop.train.checkpoint import consolidated_state_dict

    common = ["trainer.max_steps=6", "trainer.eval_every=0", *FP32]
    runs = {}
    for name, extra in (("plain", ["parallelism=zero3"]),
                        ("full", ["parallelism=zero3", "model.activation_checkpointing=full"]),
                        ("selective", ["parallelism=zero2", "model.activation_checkpointing=selective"])):
        r = sheepop("train", *tiny_overrides(tmp_path / name, *common, *extra))
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        runs[name] = latest_per_step(read_metrics(tmp_path / name), "loss")
    steps, loss = runs.pop("plain")
    assert steps == list(range(1, 7))
    for name, (s, l) in runs.items():
        assert s == steps and max(abs(a - b) for a, b in zip(loss, l)) < 1e-4, (name, loss, l)
    # The ZeRO-3 checkpoint holds the same keys (no wrapper prefix) and the same weights.
    plain, full = (consolidated_state_dict(tmp_path / n / "checkpoints" / "step_000006") for n in ("plain", "full"))
    assert full.keys() == plain.keys()
    assert max((full[k] - plain[k]).abs().max().item() for k in plain) < 1e-4
