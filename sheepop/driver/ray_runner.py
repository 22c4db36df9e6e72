"""Training on Ray: a TorchTrainer whose workers each run `sheepop.train.loop.train`.

Ray provisions the workers and their gloo/NCCL process group; DeepSpeed reuses it. Every rank
reports its checkpoint shard and Ray Train merges them into <storage>/checkpoints/step_N.
After a worker dies, Ray restarts the group (cluster.max_failures times) and each worker
resumes from the latest reported checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from pathlib import Path

from rich.console import Console

from sheepop import compat, startup, storage
from sheepop.config import Config
from sheepop.errors import UserError
from sheepop.driver.stop_forwarder import StopForwarder
from sheepop.driver.worker_env import apply_secrets, secret_env, worker_env
from sheepop.logs import copy_ray_session_logs, logs_dir, output_to
from sheepop.perf import usable_cpus
from sheepop.train.run_plan import RunPlan
from sheepop.train.stop import flag_actor


def _use_gpu(cfg: Config) -> bool:
    v = str(cfg.cluster.use_gpu).lower()
    if v == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return v == "true"


def elastic(cfg: Config) -> bool:
    return 0 < cfg.cluster.min_workers < cfg.cluster.num_workers


def cpus_per_worker(cfg: Config) -> int:
    c = cfg.cluster
    return c.cpus_per_worker or (max(1, usable_cpus() // c.num_workers) if c.kind == "local" else 1)


def check_resources(cfg: Config, per_worker: dict[str, float], console: Console) -> None:
    """Before the worker group is requested: can the cluster place num_workers workers at all?
    Otherwise Ray Train would wait on its worker-group timeout again and again. One line naming
    what the run needs and what the cluster has; with cluster.wait_for_resources (an autoscaling
    cluster), a line saying what the run waits for instead."""
    import ray

    c = cfg.cluster
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    placeable = sum(int(min((res.get(k, 0) // v for k, v in per_worker.items() if v), default=0)) for res in nodes)
    if placeable >= (c.min_workers or c.num_workers):
        return
    need = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    have = ", ".join(f"{sum(res.get(k, 0) for res in nodes):g} {k}" for k in per_worker)
    what = (f"cluster.num_workers={c.num_workers} workers × ({need}) each; the cluster has {have} over "
            f"{len(nodes)} node(s), room for {placeable} such worker(s)")
    if c.wait_for_resources:
        console.print(f"[yellow]waiting for resources: {what}; Ray's autoscaler has to add nodes[/]")
        return
    raise UserError(f"{what}; valid: cluster.num_workers <= {placeable}, fewer CPUs per worker "
                    "(cluster.cpus_per_worker), or cluster.wait_for_resources=true on an autoscaling cluster")


@contextlib.contextmanager
def environ_set(env: dict[str, str]):
    """os.environ with env added (what processes started meanwhile inherit), restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_ray(cfg: Config, console: Console) -> bool:
    """Start (kind=local) or join (kind=ray) a Ray cluster; returns True when we started it."""
    c = cfg.cluster
    env = worker_env(elastic=elastic(cfg))
    with compat.keep_sigterm_handler():
        return _start_ray(cfg, console, c, env)


def _start_ray(cfg: Config, console: Console, c, env: dict) -> bool:
    import ray

    # log_to_driver=False: the Train controller's and workers' chatter stays in Ray's logs and in
    # run.dir/logs/ (sheepop.logs); the user sees sheepop's lines and, on failure, the error.
    if c.kind == "local":
        compat.ray_local_env()
        env.update(compat.ray_loopback_only())
        env.update(compat.RAY_LOCAL_TRAIN_ENV)
        # The workers of a Ray started here inherit its processes' environment: no runtime_env, which
        # would cost a runtime-env agent round trip per worker process (2026-12-02, 2 cores: ray.init
        # 6.5 vs 4.7 s, each actor 1.9 vs 0.5 s). RAY_LOCAL_TRAIN_ENV: what Ray Train starts, kept lean.
        with environ_set(env):
            ctx = ray.init(address="local", num_cpus=c.num_cpus or usable_cpus(), include_dashboard=c.dashboard,
                           dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False,
                           logging_level="WARNING", configure_logging=True)
        started = True
    else:
        address = c.address or os.environ.get("RAY_ADDRESS", "auto")
        ctx = ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING",
                       log_to_driver=False)
        started = False
    url = getattr(ctx, "dashboard_url", None)
    if url:
        console.print(f"Ray dashboard: http://{url}" if "://" not in url else f"Ray dashboard: {url}")
    return started


def fit(plan: RunPlan, console: Console) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from sheepop.train import checkpoint

    cfg = plan.cfg
    c = cfg.cluster
    started = start_ray(cfg, console)
    try:
        gpu = _use_gpu(cfg)
        cpus = cpus_per_worker(cfg)
        resources = {"CPU": cpus}
        if gpu:
            resources["GPU"] = c.gpus_per_worker
        check_resources(cfg, resources, console)
        channel = f"sheepop-stop-{uuid.uuid4().hex[:12]}"
        flag = flag_actor(channel)
        startup.mark("ray")  # Ray started or joined, the stop channel's actor placed
        plan = dataclasses.replace(plan, stop_channel=channel, startup={**plan.startup, **startup.marks()})
        trainer = compat.ray_torch_trainer(local=started)(
            _worker,
            # Secrets travel through the object store, never through runtime_env (logged by Ray).
            train_loop_config={"plan": plan, "secrets": ray.put(secret_env())},
            # Elastic (cluster.min_workers): Ray Train restarts the group on as many workers as it can
            # place, at least min_workers; the plan holds a batch plan for each size.
            scaling_config=ScalingConfig(num_workers=(c.min_workers, c.num_workers) if elastic(cfg) else c.num_workers,
                                         use_gpu=gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            # Ray Train's run folder is <run storage>/checkpoints: each rank's upload lands in
            # checkpoints/step_N. Old checkpoints are pruned by sheepop (only complete ones count).
            run_config=RunConfig(
                name="checkpoints", **storage.for_ray_train(checkpoint.run_storage(cfg)),
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                failure_config=FailureConfig(max_failures=c.max_failures),
            ),
        )
        try:
            with StopForwarder(Path(cfg.run.dir), flag, say=console.print):
                result = trainer.fit()
        except Exception as e:  # Ray Train's TrainingFailedError wraps what the workers raised
            user_error = user_error_of(e)
            if user_error is None:
                console.print(f"[red]training failed[/]; worker and Ray logs: {logs_dir(cfg.run.dir)}")
            raise user_error or e
        return dict(result.metrics or {})
    finally:
        if started:
            try:
                copy_ray_session_logs(cfg.run.dir)
            except OSError:
                pass  # the logs are a convenience; never fail a run over them
            ray.shutdown()


def _worker(config: dict) -> None:
    """train_loop_per_worker: runs on every Ray Train worker."""
    import ray.train

    from sheepop.train.loop import train

    from ray.train import CheckpointUploadMode

    from sheepop.train import checkpoint, checkpoint_files

    plan = config["plan"]
    apply_secrets(ray.get(config["secrets"]))
    cfg = plan.cfg
    # The worker's CPU threads (Ray's default OMP_NUM_THREADS is 1); DeepSpeed's accelerator is set
    # by compat.before_deepspeed_import. Neither goes through a runtime_env (see start_ray).
    import torch

    torch.set_num_threads(cpus_per_worker(cfg))
    context = ray.train.get_context()
    rank, ray_storage = context.get_world_rank(), context.get_storage()
    ckpt_root = checkpoint.root(cfg)
    restored = ray.train.get_checkpoint()  # set after a restart: the latest reported checkpoint

    def upload(local: "ray.train.Checkpoint", dir_name: str) -> "ray.train.Checkpoint":
        """Runs in Ray Train's upload thread: this rank's files, then its manifest (what makes
        them count); rank 0 then prunes old checkpoints."""
        folder = Path(local.path)
        checkpoint_files.write_marker(folder, rank)
        checkpoint_files.upload(folder, storage.join(ckpt_root, dir_name),
                                beside_training=cfg.cluster.checkpoint_upload == "async")
        if rank == 0:
            checkpoint_files.prune(ckpt_root, cfg.trainer.keep_checkpoints)
        return ray.train.Checkpoint(path=f"{ray_storage.experiment_fs_path}/{dir_name}",
                                    filesystem=ray_storage.storage_filesystem)

    # ASYNC (default): the step after a save does not wait for the upload; the local copy goes after it.
    mode = CheckpointUploadMode.ASYNC if cfg.cluster.checkpoint_upload == "async" else CheckpointUploadMode.SYNC

    def report(directory: Path, name: str) -> None:
        ray.train.report({"step": int(name.split("_")[-1])},
                         checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=name, checkpoint_upload_mode=mode,
                         checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=True)

    with output_to(logs_dir(cfg.run.dir) / f"rank{rank}.log"):
        train(plan, report=report,
              restored=storage.join(ckpt_root, Path(restored.path).name) if restored is not None else None)


def user_error_of(error: BaseException):
    """The UserError a worker raised (bad input it found on its node), from Ray Train's wrapped
    error, so the driver prints it as one line; None when the failure was something else."""
    from sheepop.errors import UserError

    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e))
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        for attr in ("worker_failures", "errors"):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                todo += list(failures.values())
            elif isinstance(failures, (list, tuple)):
                todo += list(failures)
    return None
