"""Run a training job: checks and data in the driver, then the same loop on 1 or N ranks.

  cluster.kind=process → train() in this process (world size 1, no Ray)
  cluster.kind=local   → start Ray on 127.0.0.1, TorchTrainer with num_workers workers
  cluster.kind=ray     → connect to cluster.address / $RAY_ADDRESS, same TorchTrainer

Everything that can fail from the config alone fails here, before any worker starts. The driver
decides each thing once — resume checkpoint, batch plan, prepared data — and hands every rank
the resulting RunPlan (sheepop.train.run_plan).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import yaml
from rich.console import Console
from rich.markup import escape

from sheepop.config import Config, batch_plan, mixture_names, redact, world_sizes
from sheepop.errors import UserError
from sheepop.monitor.metrics_file import read_metrics
from sheepop.net import free_port, require_listening
from sheepop.perf import usable_cpus

console = Console(soft_wrap=True)  # a message is one line, whatever the terminal width


def preflight(cfg: Config) -> str | None:
    """Checks of the config and the places it names; returns the checkpoint to resume from
    (None = fresh start). Storage problems fail here in one line, before anything starts."""
    from sheepop import storage
    from sheepop.train import checkpoint

    c = cfg.cluster
    for world in world_sizes(cfg):  # raises on a micro batch that does not divide the global batch
        try:
            batch_plan(cfg, world)
        except UserError as e:
            raise UserError(f"{e}" + (f" (an elastic run may shrink to {world} worker(s): cluster.min_workers="
                                      f"{c.min_workers})" if world != c.num_workers else "")) from None
    if c.min_workers and c.min_workers < c.num_workers and not cfg.trainer.global_batch_size:
        raise UserError(f"cluster.min_workers={c.min_workers} keeps the global batch when workers are lost: pin it "
                        "with trainer.global_batch_size (and trainer.grad_accum_steps=0)")
    if cfg.parallelism.deepspeed:  # raw DeepSpeed keys: read by DeepSpeed's own parser now, not first in a rank
        from sheepop.train.engine import check_deepspeed_config

        check_deepspeed_config(cfg, batch_plan(cfg, c.num_workers))
    if c.kind == "ray":
        check_ray_address(c.address or os.environ.get("RAY_ADDRESS", ""))
    if c.kind == "local":  # this machine alone decides what a local Ray can place: say so before starting it
        have = c.num_cpus or usable_cpus()
        per = c.cpus_per_worker or max(1, usable_cpus() // c.num_workers)
        if c.num_workers * per > have:
            raise UserError(f"cluster.num_workers={c.num_workers} × {per} CPU(s) each needs {c.num_workers * per} CPUs; "
                            f"cluster=local has {have} (cluster.num_cpus={c.num_cpus or 'all'}); valid: "
                            f"cluster.num_workers <= {max(1, have // per)}, or cluster=ray on a bigger cluster")
    storage.check_writable(cfg.run.dir, "run.dir")
    check_run_dir(cfg)
    if c.storage_path:
        storage.check_writable(c.storage_path, "cluster.storage_path")
    if storage.is_uri(cfg.data.out_dir) and not cfg.data.mixture:  # a mixture prepares nothing: only reads its sources
        storage.check_writable(storage.normalize(cfg.data.out_dir), "data.out_dir")
    if not cfg.data.mixture:  # a data.out_dir that preparing would wrongly replace
        from sheepop.data.shards import check_out_dir

        check_out_dir(cfg)
    if c.kind in ("process", "local"):  # every rank writes on this machine: room for one checkpoint?
        ckpt_root = checkpoint.root(cfg)
        where = checkpoint.staging_dir(cfg) if storage.is_uri(ckpt_root) else storage.local_path(ckpt_root)
        if storage.is_uri(ckpt_root) and c.checkpoint_staging != "auto":
            storage.check_writable(str(where), "cluster.checkpoint_staging")
        checkpoint.check_space(where, checkpoint.estimated_bytes(cfg), "the first checkpoint")
    resume = checkpoint.resolve_resume(cfg, log=lambda m: console.print(m, style="yellow", markup=False))
    if resume is not None:
        checkpoint.check_stage_change(resume, cfg.parallelism.zero_stage)
    if resume is None and cfg.trainer.init_from:  # a resume has trained weights: init_from is for step 0 only
        checkpoint.check_hf(cfg)
    if cfg.trainer.eval_tasks:
        from sheepop.train.task_eval import check_tasks

        check_tasks(list(cfg.trainer.eval_tasks))
    prebuild_ops(cfg)
    existing = checkpoint.list_checkpoints(checkpoint.root(cfg))
    if cfg.trainer.resume == "never" and existing:
        raise UserError(f"{checkpoint.root(cfg)} already has checkpoints ({existing[-1].rsplit('/', 1)[-1]}); "
                        "use trainer.resume=auto to continue it, or a new run.dir / run.name")
    if resume is not None:
        meta = checkpoint.read_meta(resume)
        check_no_newer_checkpoints(cfg, resume, meta["step"], existing)
        if meta["step"] >= cfg.trainer.max_steps:
            raise UserError(f"checkpoint {resume} is at step {meta['step']} >= trainer.max_steps="
                            f"{cfg.trainer.max_steps}: nothing to train; raise trainer.max_steps")
        check_same_model(cfg, resume)
    return resume


def check_no_newer_checkpoints(cfg: Config, resume: str, step: int, existing: list[str]) -> None:
    """A resume from an older checkpoint of this very run (trainer.resume=<run>/checkpoints/step_N
    while step_M > N is complete there) would save over the newer ones step by step, and until it
    did, `trainer.resume=auto` after a failure would pick a checkpoint of the abandoned branch."""
    from sheepop import storage
    from sheepop.train import checkpoint_files

    if storage.normalize(resume).rsplit("/", 1)[0] != storage.normalize(checkpoint_files.root(cfg)):
        return  # another run's checkpoint: this run's folder is its own
    newer = [c for c in existing if checkpoint_files.step_of(c) > step and checkpoint_files.problem(c) is None]
    if newer:
        raise UserError(f"trainer.resume={cfg.trainer.resume}: this run has newer checkpoints "
                        f"({', '.join(storage.name(c) for c in newer)}) that the resumed run would overwrite; "
                        f"valid: trainer.resume=auto (the newest), a new run.dir or run.name to branch from "
                        f"{storage.name(resume)}, or delete the newer checkpoints first")


def prebuild_ops(cfg: Config) -> None:
    """DeepSpeed's JIT-built C++ ops: a build lock nobody will release is one line, not a silent
    wait; where the ranks run here, the ops are built once into this environment before they start."""
    from sheepop import extensions

    extensions.check_locks()
    if cfg.cluster.kind in ("process", "local"):  # remote nodes build in their own environments
        extensions.activate()
        from sheepop.train.engine import deepspeed_config

        ds = deepspeed_config(cfg, batch_plan(cfg, cfg.cluster.num_workers))
        extensions.prebuild(extensions.needed_ops(ds), log=lambda m: console.print(m, style="yellow", markup=False))


def check_same_model(cfg: Config, ckpt: str) -> None:
    """A checkpoint only loads into the model shape it was saved from: say which setting differs
    now, before DeepSpeed fails on every rank with a page of size mismatches."""
    from sheepop import storage

    saved_cfg = storage.join(ckpt, "config.yaml")
    if not storage.is_file(saved_cfg):
        return
    saved = yaml.safe_load(storage.read_text(saved_cfg)).get("model", {})
    now = cfg.model
    diff = [k for k in now.WEIGHT_FIELDS if k in saved and saved[k] != getattr(now, k)]
    if diff:
        shown = ", ".join(f"model.{k}={getattr(now, k)} (checkpoint: {saved[k]})" for k in diff)
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


def make_plan(cfg: Config, resume: str | None, manifest: dict, mixture: tuple = ()):
    """The RunPlan every rank gets: decided here, once. A resume on another world size or ZeRO
    stage is converted to the universal format here too, before any rank starts; imported weights
    (trainer.init_from) are for a fresh start only."""
    from sheepop.model.hf import init_from_folder
    from sheepop.train import checkpoint
    from sheepop.train.run_plan import RunPlan

    workers = cfg.cluster.num_workers
    universal = None
    if resume is not None and checkpoint.needs_universal(resume, workers, cfg.parallelism.zero_stage):
        universal = checkpoint.to_universal(resume, checkpoint.run_storage(cfg))
    init_from = str(init_from_folder(cfg.trainer.init_from)) if resume is None and cfg.trainer.init_from else None
    return RunPlan(cfg=cfg, batch=batch_plan(cfg, workers), resume=resume, universal=universal, manifest=manifest,
                   elastic={w: batch_plan(cfg, w) for w in world_sizes(cfg) if w != workers}, init_from=init_from,
                   mixture=tuple(mixture))


def run(cfg: Config) -> dict:
    """The driver: validate, prepare data, decide the plan, write config.yaml, train, then plot and sample."""
    import dataclasses

    from sheepop import startup, storage
    from sheepop.data.mixture import load_sources

    sources = load_sources(cfg) if cfg.data.mixture else []  # a mixture's sources are prepared already: checked here
    resume = preflight(cfg)
    startup.mark("preflight")
    run_dir = Path(cfg.run.dir).expanduser().absolute()
    # Workers may run in another cwd: every path they get is absolute (URIs stay as they are).
    # data.mixture: every source named (default: its folder's name) and absolute, in config.yaml too.
    mixture = [dataclasses.replace(s, out_dir=storage.normalize(s.out_dir), name=n)
               for s, n in zip(cfg.data.mixture, mixture_names(cfg.data.mixture))]
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)),
        data=dataclasses.replace(cfg.data, out_dir=storage.normalize(cfg.data.out_dir), mixture=mixture),
        cluster=dataclasses.replace(cfg.cluster, storage_path=storage.normalize(cfg.cluster.storage_path)
                                    if cfg.cluster.storage_path else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunDirLock(run_dir):
        return _run(cfg, run_dir, resume, sources)


def _run(cfg: Config, run_dir: Path, resume: str | None, sources: list) -> dict:
    import dataclasses

    from sheepop import startup
    from sheepop.data.shards import local_dir, prepare
    from sheepop.monitor.live import LiveView
    from sheepop.monitor.plot import plot_loss

    (run_dir / "STOP").unlink(missing_ok=True)
    console.print(f"[bold]sheepop[/] run → {escape(str(run_dir))}" + (f"  (resuming {escape(resume)})" if resume else ""))
    manifest = sources[0].manifest if sources else prepare(cfg, log=lambda m: console.print(m, markup=False))
    startup.mark("data")
    plan = make_plan(cfg, resume, manifest, sources)
    for name, m in ([(s.name, s.manifest) for s in sources] or [("", manifest)]):
        check_windows(m, plan.batch.seq_len, name)
    # Written only now that every check has passed: a start that fails leaves the run's files as they were.
    (run_dir / "config.yaml").write_text(yaml.safe_dump(redact(cfg), sort_keys=False))
    shutil.copy(local_dir(sources[0].out_dir if sources else cfg.data.out_dir) / "tokenizer.json",
                run_dir / "tokenizer.json")
    mirror_run_files(cfg, run_dir, ("config.yaml", "tokenizer.json"))
    startup.mark("plan")
    plan = dataclasses.replace(plan, startup={"launch": startup.process_start(), **startup.marks()})
    if sources:
        console.print("data mixture: " + ", ".join(f"{s.name} {s.weight:.1%} of windows "
                                                   f"({s.manifest['splits']['train']['tokens']:,} training tokens)"
                                                   for s in sources), markup=False)
    console.print(f"{sum(m['splits']['train']['tokens'] for m in ([s.manifest for s in sources] or [manifest])):,} "
                  f"training tokens; {plan.batch.describe()}, "
                  f"ZeRO stage {cfg.parallelism.zero_stage}" + (" (universal resume)" if plan.universal else ""))

    view = LiveView(run_dir, cfg.trainer.max_steps, console, launch=True) if cfg.trainer.progress else None
    try:
        if view:
            view.__enter__()
        if cfg.cluster.kind == "process":
            from sheepop.train.loop import train

            # A world of one, set rather than defaulted: a shell inside someone else's torchrun or
            # Slurm job has RANK/WORLD_SIZE/MASTER_* of that job, and this rank would wait for its peers.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
            result = train(plan)  # installs its own Ctrl-C handler
        else:
            from sheepop.driver.ray_runner import fit

            result = fit(plan, console)  # forwards SIGINT/SIGTERM to the ranks as a stop request
    finally:
        if view:
            view.__exit__(None, None, None)
    (run_dir / "STOP").unlink(missing_ok=True)
    fetch_metrics(cfg, run_dir)
    ends = [r for r in read_metrics(run_dir) if r.get("event") == "end"]
    result = {**result, "stopped": bool(ends and ends[-1].get("stopped"))}
    plot_loss(run_dir)
    sample = write_sample(cfg, run_dir)
    mirror_run_files(cfg, run_dir, ("loss.png", "sample.txt"))
    console.print(f"[bold]sample[/] ({escape(repr(cfg.trainer.sample_prompt))} →):")
    console.print(sample, markup=False, highlight=False)  # model output: neither markup nor highlighted
    console.print(f"artefacts: {run_dir}/{{config.yaml, metrics.jsonl, tokenizer.json, loss.png, sample.txt, logs/}}; "
                  f"checkpoints: {checkpoint_root(cfg)}", markup=False)
    if result["stopped"]:
        stop = next((r for r in reversed(read_metrics(run_dir)) if r.get("event") == "stop"), {})
        console.print(f"stopped at step {ends[-1].get('step')} ({stop.get('reason', 'a stop request')}), after its "
                      f"checkpoint; the same command (trainer.resume=auto) continues from there", markup=False)
    return result


class RunDirLock:
    """One driver per run.dir at a time: a second `sheepop train` there would rewrite the first
    one's config.yaml and interleave its checkpoints. An flock, so a driver that dies (even by
    SIGKILL) leaves nothing to clean up; the file names the holder for the refusal."""

    NAME = ".sheepop.lock"

    def __init__(self, run_dir: Path):
        self.path = run_dir / self.NAME
        self.fd: int | None = None

    def __enter__(self):
        import fcntl
        import socket

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run.dir={self.path.parent} is in use by a running `sheepop train` ({holder}); wait "
                            f"for it to end, stop it (touch {self.path.parent}/STOP), or give another run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock; the file stays (removing it would race the next holder)


def check_run_dir(cfg: Config) -> None:
    """run.dir is named, lies outside the prepared data (preparing again replaces data.out_dir as
    a whole), and is not someone else's folder: a config.yaml there that is not a sheepop run's
    would be overwritten (and its metrics.jsonl, tokenizer.json, ...)."""
    from sheepop import storage

    run_dir = cfg.run.dir
    if not str(run_dir).strip():
        raise UserError("run.dir= is empty; give the run's folder (default: outputs/<date>/<time>)")
    if storage.is_uri(run_dir):
        return
    data = [s.out_dir for s in cfg.data.mixture] or [cfg.data.out_dir]
    here = Path(run_dir).expanduser().resolve()
    for out in data:
        if not storage.is_uri(out) and (here == Path(out).expanduser().resolve()
                                        or Path(out).expanduser().resolve() in here.parents):
            raise UserError(f"run.dir={run_dir} is inside data.out_dir={out}, which preparing the data again "
                            f"replaces as a whole; give a run.dir outside it")
    found = Path(run_dir).expanduser() / "config.yaml"
    if not found.is_file():
        return
    try:
        saved = yaml.safe_load(found.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not (isinstance(saved, dict) and {"model", "trainer", "run"} <= saved.keys()):
        raise UserError(f"run.dir={run_dir} has a config.yaml that is not a sheepop run's, which the run would "
                        f"overwrite; give a new folder (or the run.dir of an earlier sheepop run)")


def check_windows(manifest: dict, seq_len: int, source: str = "") -> None:
    """Each split needs a shard longer than one window (seq_len inputs + 1 target): the ranks
    would fail on it after the engine is built."""
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        if not any(s["tokens"] > seq_len + 1 for s in shards):
            longest = max((s["tokens"] for s in shards), default=0)
            raise UserError(f"{'data source ' + source + ': ' if source else ''}the {split} split's longest shard "
                            f"has {longest:,} tokens, too few for one window of {seq_len + 1} (trainer.seq_len="
                            f"{seq_len} + 1); add data (data.paths=[...]) or lower trainer.seq_len")


def checkpoint_root(cfg: Config) -> str:
    from sheepop.train.checkpoint import root

    return root(cfg)


def fetch_metrics(cfg: Config, run_dir: Path) -> None:
    """When rank 0 ran on another node, its metrics.jsonl reached this machine only through storage."""
    from sheepop import storage
    from sheepop.train.checkpoint import run_storage

    if not cfg.cluster.storage_path:
        return
    remote = storage.join(run_storage(cfg), "metrics.jsonl")
    local = run_dir / "metrics.jsonl"
    sizes = storage.sizes(run_storage(cfg))
    if "metrics.jsonl" in sizes and (not local.is_file() or local.stat().st_size < sizes["metrics.jsonl"]):
        local.write_bytes(storage.read_bytes(remote))


def mirror_run_files(cfg: Config, run_dir: Path, names: tuple[str, ...]) -> None:
    """With cluster.storage_path set, the run's own files go beside its checkpoints
    (<storage_path>/<run.name>/), where `sheepop watch|report|generate|eval|export` find them."""
    from sheepop import storage
    from sheepop.train.checkpoint import run_storage

    if cfg.cluster.storage_path:
        storage.upload(run_dir, run_storage(cfg), [n for n in names if (run_dir / n).is_file()])


def write_sample(cfg: Config, run_dir: Path) -> str:
    """A sample from the latest checkpoint (top-k 40, temperature 0.8, token healing)."""
    from sheepop.model.generate import complete
    from sheepop.train.checkpoint import load_model, root

    if cfg.trainer.sample_tokens == 0:
        return ""
    model, tok, _ = load_model(root(cfg))
    ids = tok.encode(cfg.trainer.sample_prompt).ids
    text = complete(model, tok, ids, cfg.trainer.sample_tokens, eot=cfg.tokenizer.eot, temperature=0.8,
                    top_k=40, seed=cfg.run.seed)[0]
    (run_dir / "sample.txt").write_text(text)
    return text
