"""Run a training job: checks and data in the driver, then the same loop on 1 or N ranks.

  cluster.kind=process → train() in this process (world size 1, no Ray)
  cluster.kind=local   → start Ray on 127.0.0.1, TorchTrainer with num_workers workers
  cluster.kind=ray     → connect to cluster.address / $RAY_ADDRESS, same TorchTrainer

Everything that can fail from the config alone fails here, before any worker starts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from urllib.parse import urlparse

import yaml
from rich.console import Console

from sheepop.config import batch_plan, redact
from sheepop.errors import UserError
from sheepop.net import require_listening
from sheepop.train.metrics import read_metrics

console = Console()

# Environment every Ray worker needs (Ray does not forward the driver's environment).
WORKER_ENV = {
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # report() otherwise blocks ~1.8 s on the controller poll
    "SHEEPOP_DS_LOG_LEVEL": os.environ.get("SHEEPOP_DS_LOG_LEVEL", "WARNING"),
}
FORWARD_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
               "WANDB_BASE_URL", "TORCH_EXTENSIONS_DIR")


def preflight(cfg: dict) -> Path | None:
    """Config-only checks; returns the checkpoint to resume from (None = fresh start)."""
    from sheepop.train import checkpoint

    c = cfg["cluster"]
    batch_plan(cfg, c["num_workers"])  # raises on a micro batch that does not divide the global batch
    if c["kind"] == "ray":
        check_ray_address(c["address"] or os.environ.get("RAY_ADDRESS", ""))
    resume = checkpoint.resolve_resume(cfg)
    existing = checkpoint.latest(checkpoint.root(cfg))
    if cfg["trainer"]["resume"] == "never" and existing is not None:
        raise UserError(f"run.dir={cfg['run']['dir']} already has checkpoints ({existing.name}); "
                        "use trainer.resume=auto to continue it or a new run.dir")
    if resume is not None:
        meta = checkpoint.read_meta(resume)
        if meta["step"] >= cfg["trainer"]["max_steps"]:
            raise UserError(f"checkpoint {resume} is at step {meta['step']} >= trainer.max_steps="
                            f"{cfg['trainer']['max_steps']}: nothing to train; raise trainer.max_steps")
        check_same_model(cfg, resume)
    return resume


def check_same_model(cfg: dict, ckpt: Path) -> None:
    """A checkpoint only loads into the model shape it was saved from: say which setting differs
    now, before DeepSpeed fails on every rank with a page of size mismatches."""
    import dataclasses

    import yaml

    from sheepop.model import ModelArgs

    saved_cfg = ckpt / "config.yaml"
    if not saved_cfg.is_file():
        return
    saved = yaml.safe_load(saved_cfg.read_text()).get("model", {})
    # max_seq_len only sizes the RoPE tables (not saved); init_std only matters before step 0.
    keys = [f.name for f in dataclasses.fields(ModelArgs) if f.name not in ("max_seq_len", "init_std")]
    diff = [k for k in keys if k in saved and saved[k] != cfg["model"][k]]
    if diff:
        shown = ", ".join(f"model.{k}={cfg['model'][k]} (checkpoint: {saved[k]})" for k in diff)
        raise UserError(f"checkpoint {ckpt} holds another model: {shown}; valid: the checkpoint's model "
                        "settings, or a new run.dir")


def check_ray_address(address: str) -> None:
    """Fail fast (and in one line) when nobody listens at a Ray address."""
    if not address:
        raise UserError("cluster=ray needs cluster.address=HOST:PORT (or ray://HOST:10001) or $RAY_ADDRESS")
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    require_listening(host, port, f"cluster.address={address}", "start a cluster with `ray start --head` or fix the address")


def run(cfg: dict) -> dict:
    """The driver: validate, prepare data, write config.yaml, train, then plot and sample."""
    from sheepop.data.shards import prepare
    from sheepop.train.live import LiveView
    from sheepop.train.plot import plot_loss

    resume = preflight(cfg)
    run_dir = Path(cfg["run"]["dir"]).expanduser().absolute()
    cfg["run"]["dir"] = str(run_dir)  # workers may run in another cwd
    cfg["data"]["out_dir"] = str(Path(cfg["data"]["out_dir"]).expanduser().absolute())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "STOP").unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(redact(cfg), sort_keys=False))
    console.print(f"[bold]sheepop[/] run → {run_dir}" + (f"  (resuming {resume})" if resume else ""))
    manifest = prepare(cfg, log=console.print)
    shutil.copy(Path(cfg["data"]["out_dir"]) / "tokenizer.json", run_dir / "tokenizer.json")
    plan = batch_plan(cfg, cfg["cluster"]["num_workers"])
    console.print(f"{manifest['splits']['train']['tokens']:,} training tokens; global batch "
                  f"{plan['global_batch_size']} × {plan['seq_len']} = {plan['tokens_per_step']:,} tokens/step "
                  f"({cfg['cluster']['num_workers']} worker(s) × micro {plan['micro_batch_size']} × accum "
                  f"{plan['grad_accum_steps']}), ZeRO stage {cfg['parallelism']['zero_stage']}")

    view = LiveView(run_dir, cfg["trainer"]["max_steps"], console) if cfg["trainer"]["progress"] else None
    try:
        if view:
            view.__enter__()
        if cfg["cluster"]["kind"] == "process":
            from sheepop.train.loop import train

            result = train(cfg)  # installs its own Ctrl-C handler
        else:
            from sheepop.ray_runner import fit

            with stop_file_on_ctrl_c(run_dir):
                result = fit(cfg, resume, console)
    finally:
        if view:
            view.__exit__(None, None, None)
    (run_dir / "STOP").unlink(missing_ok=True)
    ends = [r for r in read_metrics(run_dir) if r.get("event") == "end"]
    result = {**result, "stopped": bool(ends and ends[-1].get("stopped"))}
    plot_loss(run_dir)
    sample = write_sample(cfg, run_dir)
    console.print(f"[bold]sample[/] ({cfg['trainer']['sample_prompt']!r} →):\n{sample}")
    console.print(f"artefacts: {run_dir}/{{config.yaml, metrics.jsonl, tokenizer.json, checkpoints/, loss.png}}")
    return result


@contextlib.contextmanager
def stop_file_on_ctrl_c(run_dir: Path):
    """In the driver of a Ray run, the first Ctrl-C writes run.dir/STOP: every worker sees it at
    its next step, saves a checkpoint and returns. A second Ctrl-C aborts."""
    pressed = []

    def handler(*_):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(1)
        (run_dir / "STOP").touch()
        console.print("[yellow]stopping: workers save a checkpoint at the end of this step (Ctrl-C again to abort)")

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def write_sample(cfg: dict, run_dir: Path) -> str:
    """A sample from the latest checkpoint (top-k 40, temperature 0.8)."""
    from sheepop.model.generate import generate
    from sheepop.train.checkpoint import load_model, root

    model, tok, _ = load_model(root(cfg))
    prompt = cfg["trainer"]["sample_prompt"]
    ids = tok.encode(prompt).ids
    n = min(cfg["trainer"]["sample_tokens"], model.args.max_seq_len - len(ids) - 1)
    out = generate(model, [ids], n, temperature=0.8, top_k=40, seed=cfg["run"]["seed"],
                   eos_id=tok.token_to_id("<|endoftext|>"))
    text = prompt + tok.decode(out[0])
    (run_dir / "sample.txt").write_text(text)
    return text
