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
# Forwarded from the driver's environment when set there.
FORWARD_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
               "WANDB_BASE_URL", "TORCH_EXTENSIONS_DIR")


def worker_env() -> dict[str, str]:
    """WORKER_ENV plus the forwarded variables, less those a Ray Job's runtime_env already sets."""
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in FORWARD_ENV if k in os.environ})
    job = compat.ray_job_env_vars()
    return {k: v for k, v in env.items() if k not in job}
