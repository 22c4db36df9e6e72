"""The environment every training worker gets (Ray does not forward the driver's environment)."""
from __future__ import annotations

import os

from sheepop import compat

WORKER_ENV = {
    "PYTHONWARNINGS": "ignore::FutureWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "SHEEPOP_DS_LOG_LEVEL": os.environ.get("SHEEPOP_DS_LOG_LEVEL", "WARNING"),
    **compat.RAY_TRAIN_ENV,
}
# Forwarded from the driver's environment when set there, through Ray's runtime_env (which Ray
# writes to its logs and job table: nothing secret here).
FORWARD_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_BASE_URL",
               "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
               "SHEEPOP_MALLOC")  # the run's malloc decision (sheepop.cpu_allocator)
# Secrets go another way: the driver puts them in Ray's object store and each worker sets them in
# its own environment (secret_env / apply_secrets); Ray's runtime-env agent logs env_vars in plain text.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def worker_env(elastic: bool = False) -> dict[str, str]:
    """WORKER_ENV plus the forwarded variables, less those a Ray Job's runtime_env already sets.
    elastic: a run whose worker group may shrink (cluster.min_workers), which waits less for one."""
    env = dict(WORKER_ENV)
    if elastic:
        env.update(compat.RAY_TRAIN_ELASTIC_ENV)
    env.update({k: os.environ[k] for k in FORWARD_ENV if k in os.environ})
    job = compat.ray_job_env_vars()
    return {k: v for k, v in env.items() if k not in job}


def secret_env() -> dict[str, str]:
    """The secrets of this environment that workers need (sent through the object store)."""
    return {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


def apply_secrets(secrets: dict[str, str]) -> None:
    """In a worker: the driver's secrets, unless this worker's environment has its own."""
    for k, v in secrets.items():
        os.environ.setdefault(k, v)
