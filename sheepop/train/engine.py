"""The DeepSpeed engine: its JSON config from ours, process-group setup, initialisation.

This is the one place that wraps the model for parallelism (the model file knows nothing of
it). World size 1 goes through the very same engine, so a laptop run and a cluster run
differ only in how many processes call `build`.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from sheepop import compat

compat.before_deepspeed_import()

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402

from sheepop.config import BatchPlan, Config, grad_accum_dtype  # noqa: E402
from sheepop.errors import UserError  # noqa: E402
from sheepop.net import free_port  # noqa: E402
from sheepop.train import activation_checkpointing  # noqa: E402
from sheepop.train import compilation  # noqa: E402
from sheepop.train.update_gate import GatedAdamW, GatedLambdaLR, UpdateGate  # noqa: E402

ds_logger.setLevel(os.environ.get("SHEEPOP_DS_LOG_LEVEL", "WARNING"))
compat.quiet_deepspeed_build_notice()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@functools.cache
def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # CPUs with AVX512-BF16 / AMX run bf16 matmuls natively; others emulate them slowly
        flags = open("/proc/cpuinfo").read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def precision_mode(precision: str) -> str:
    """What trainer.precision means on this machine: one of bf16, bf16-autocast, fp32.

    bf16 is DeepSpeed's bf16 mode, the usual mixed precision of large-model training: the module
    holds bf16 weights and gradients, the optimizer an fp32 master copy and fp32 moments, so ZeRO
    shards the master with the moments (12 bytes/param of optimizer state split across ranks).
    bf16-autocast keeps fp32 weights and runs matmuls under torch.autocast (an fp32 residual
    stream; ZeRO must then add its own fp32 master copy of each partition). auto = bf16 where
    the hardware has it, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the loop autocasts to (bf16-autocast only), or None."""
    return torch.bfloat16 if precision_mode(precision) == "bf16-autocast" else None


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype matmuls run in (picks the peak FLOP/s for MFU): bf16, or None for fp32."""
    return None if precision_mode(precision) == "fp32" else torch.bfloat16


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Reuses a process group that Ray Train already set up; otherwise starts
    the world the environment names (torchrun-style RANK, WORLD_SIZE, MASTER_*; the driver sets a
    world of one for cluster=process), by default one of one (DeepSpeed insists on a process group)."""
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    from sheepop.extensions import activate

    activate()  # DeepSpeed's ops from this environment's own build folder (built by the driver)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(cfg: Config, batch: BatchPlan) -> dict:
    """DeepSpeed JSON from sheepop's config and the driver's batch plan; `parallelism.deepspeed`
    raw keys merge last."""
    p, t = cfg.parallelism, cfg.trainer
    zero: dict = {
        "stage": p.zero_stage,
        "overlap_comm": p.overlap_comm,
        "contiguous_gradients": p.contiguous_gradients,
        "reduce_bucket_size": p.reduce_bucket_size,
    }
    if p.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = p.allgather_bucket_size
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum_steps,
        "train_batch_size": batch.global_batch_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW as client optimizer
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision_mode(t.precision) == "bf16":
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": grad_accum_dtype("bf16", t.grad_accum_dtype, p.zero_stage)}
    if p.offload_optimizer:
        # Offloaded optimizer state must be stepped by DeepSpeed's CPU Adam (JIT-built once).
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay}}
    return _merge(ds, p.deepspeed or {})


class _KeysAskedFor(dict):
    """A config dict that records the top-level keys DeepSpeed's parser asks for. DeepSpeed copies
    it (copy.copy keeps the class and shares `asked`) and reads it with get/[]/in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)


def check_deepspeed_config(cfg: Config, batch: BatchPlan) -> None:
    """Raw `parallelism.deepspeed` keys, checked in the driver the way DeepSpeed's own parser reads
    them: a top-level key it never asks for (DeepSpeed 0.19 ignores those silently) and a bad
    nested one (its pydantic sections refuse unknown keys, but only once a rank builds its engine)
    are one line here, before any worker starts."""
    raw = cfg.parallelism.deepspeed or {}
    if not raw:
        return
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    ds = deepspeed_config(cfg, batch)
    # The driver has no process group: DeepSpeed takes world size 1 here, so its batch check sees one rank's batch.
    ds["train_batch_size"] = batch.micro_batch_size * batch.grad_accum_steps
    parsed = _KeysAskedFor(ds)
    level = ds_logger.level
    ds_logger.setLevel("ERROR")  # its INFO lines (world size, config) are not the driver's to print
    try:
        DeepSpeedConfig(parsed)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        section = next((k for k, v in raw.items() if isinstance(v, dict) and str(err["loc"][0]) in v), None)
        what = (f"not a key DeepSpeed {deepspeed.__version__} reads there" if err["type"] == "extra_forbidden"
                else f"{err['msg']} (DeepSpeed {deepspeed.__version__}'s {e.title})")
        raise UserError(f"parallelism.deepspeed.{section + '.' if section else ''}{where}: {what}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"parallelism.deepspeed={raw}: DeepSpeed {deepspeed.__version__} refuses it: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        ds_logger.setLevel(level)
    unknown = sorted(set(raw) - parsed.asked)
    if unknown:
        raise UserError(f"parallelism.deepspeed.{unknown[0]}: not a key DeepSpeed {deepspeed.__version__} reads "
                        "(it would be ignored); see https://www.deepspeed.ai/docs/config-json/")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names in optimizer order: matrices (linear and embedding weights) decay, norms'
    gains do not. Tied weights appear once, under their first name."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    """Linear warmup to trainer.lr, then cosine to trainer.min_lr at max_steps (a multiplier of lr)."""
    t = cfg.trainer
    warm, total, floor = t.warmup_steps, t.max_steps, t.min_lr / t.lr

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build(model: torch.nn.Module, cfg: Config, batch: BatchPlan, load_universal: bool = False):
    """Wrap the model: returns the DeepSpeed engine (its .optimizer, .lr_scheduler and .update_gate set).

    load_universal: the checkpoint to load next is in DeepSpeed's universal format (a resume
    on another world size or ZeRO stage)."""
    activation_checkpointing.apply(model, cfg.model.activation_checkpointing, cfg.model.activation_checkpointing_every)
    t = cfg.trainer
    compile_on = compilation.enabled(t.compile)  # trainer.compile (sheepop.train.compilation)
    if compile_on and cfg.parallelism.zero_stage == 3:
        compilation.mark_zero3_leaves(model)
    ds_cfg = deepspeed_config(cfg, batch)
    if load_universal:
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    groups = param_groups(model, t.weight_decay)
    gate = UpdateGate()
    optimizer = None
    if "optimizer" not in ds_cfg:
        # fused: one kernel per parameter group instead of a dozen ops per tensor (torch >= 2.4 has it
        # on CPU and GPU); torch's default is a per-tensor for-loop on CPU, foreach on GPU
        optimizer = GatedAdamW(groups, gate, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                               **({"fused": True} if t.fused_optimizer else {}))

    def scheduler(opt):
        return GatedLambdaLR(opt, lr_lambda(cfg), gate)

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False)
    if compile_on:  # after initialize, so that nothing DeepSpeed adds to the blocks is compiled with them
        compat.inductor_cache(cfg.run.dir)  # a restart of this run reuses what it compiled
        compilation.apply(engine.module, t.compile_mode)
    engine.update_gate = gate  # the loop's say over the next update (skip it, scale its rate)
    return engine


def shutdown() -> None:
    """Barrier, destroy, then let gloo's threads finish: without the barrier and destroy 2 of 8 gloo runs
    here aborted at exit (SIGABRT, "terminate called without an active exception"); with them alone
    1 in ~13 still did (compat.let_gloo_threads_finish says why); with all three 0 of 40."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        compat.let_gloo_threads_finish()
