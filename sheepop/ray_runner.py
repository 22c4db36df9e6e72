"""Training on Ray: a TorchTrainer whose workers each run `sheepop.train.loop.train`.

Ray provisions the workers and their gloo/NCCL process group; DeepSpeed reuses it. Every rank
reports its checkpoint shard and Ray Train merges them into <storage>/checkpoints/step_N.
After a worker dies, Ray restarts the group (cluster.max_failures times) and each worker
resumes from the latest reported checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from sheepop.net import ray_loopback_only
from sheepop.runner import FORWARD_ENV, WORKER_ENV


def _use_gpu(cfg: dict) -> bool:
    v = str(cfg["cluster"]["use_gpu"]).lower()
    if v == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return v == "true"


def start_ray(cfg: dict, console: Console) -> bool:
    """Start (kind=local) or join (kind=ray) a Ray cluster; returns True when we started it."""
    import ray

    c = cfg["cluster"]
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in FORWARD_ENV if k in os.environ})
    # Inside a Ray Job the job's runtime_env already reaches every worker; Ray refuses to merge
    # a driver env var that the job also sets (and its error would print the value).
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}
    if c["kind"] == "local":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.update(ray_loopback_only())
        ctx = ray.init(address="local", num_cpus=c["num_cpus"] or None, include_dashboard=True,
                       dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                       runtime_env={"env_vars": env}, logging_level="WARNING", configure_logging=True)
        started = True
    else:
        address = c["address"] or os.environ.get("RAY_ADDRESS", "auto")
        ctx = ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING")
        started = False
    url = getattr(ctx, "dashboard_url", None)
    if url:
        console.print(f"Ray dashboard: http://{url}" if "://" not in url else f"Ray dashboard: {url}")
    return started


def fit(cfg: dict, resume: Path | None, console: Console) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sheepop.train import checkpoint

    c = cfg["cluster"]
    started = start_ray(cfg, console)
    try:
        gpu = _use_gpu(cfg)
        cpus = c["cpus_per_worker"] or (max(1, (os.cpu_count() or 1) // c["num_workers"]) if c["kind"] == "local" else 1)
        resources = {"CPU": cpus}
        if gpu:
            resources["GPU"] = c["gpus_per_worker"]
        ckpt_root = checkpoint.root(cfg)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg, "resume": str(resume) if resume else None},
            scaling_config=ScalingConfig(num_workers=c["num_workers"], use_gpu=gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            run_config=RunConfig(
                name=ckpt_root.name, storage_path=str(ckpt_root.parent),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg["trainer"]["keep_checkpoints"] or None),
                failure_config=FailureConfig(max_failures=c["max_failures"]),
                worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if gpu else "cpu",
                                                 "OMP_NUM_THREADS": str(cpus)}},
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        return dict(result.metrics or {})
    finally:
        if started:
            ray.shutdown()


def _worker(config: dict) -> None:
    """train_loop_per_worker: runs on every Ray Train worker."""
    import ray.train

    from sheepop.train.loop import train

    ckpt = ray.train.get_checkpoint()  # set after a restart: the latest reported checkpoint
    resume = Path(ckpt.path) if ckpt is not None else (Path(config["resume"]) if config["resume"] else None)

    def report(directory: Path, name: str) -> None:
        ray.train.report({"step": int(name.split("_")[-1])},
                         checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=name)

    train(config["cfg"], report=report, resume_dir=resume)
