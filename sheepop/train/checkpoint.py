"""Checkpoints: one folder per save, holding everything a resume needs.

  <root>/step_000100/
      ds/                DeepSpeed engine state: weights, optimizer (one shard per rank), scheduler
      meta.json          step, world size, ZeRO stage, W&B run id, tokens seen
      config.yaml        the resolved config (secrets redacted)
      tokenizer.json

<root> is <cluster.storage_path or run.dir>/checkpoints. Without Ray the folder is written
in place (as step_N.tmp, renamed when complete). With Ray each rank writes its own shard to a
local temporary folder and reports it; Ray Train merges the ranks' folders into one.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from sheepop import compat
from sheepop.config import Config, redact
from sheepop.model.config import ModelConfig
from sheepop.errors import UserError

DS_TAG = "ds"


def root(cfg: Config) -> Path:
    base = cfg.cluster.storage_path or cfg.run.dir
    return Path(base).expanduser().absolute() / "checkpoints"


def name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (meta.json present), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: read_meta(p)["step"])


def latest(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint trainer.resume asks for: auto → newest in this run, never → None, else a path.
    Called by the driver only; ranks get its answer in the run plan."""
    r = cfg.trainer.resume
    if r == "never":
        return None
    if r == "auto":
        return latest(root(cfg))
    p = Path(r).expanduser()
    if p.is_dir() and (p / "meta.json").is_file():
        return p
    if p.is_dir() and latest(p):  # a checkpoints/ folder or a run dir
        return latest(p)
    if p.is_dir() and latest(p / "checkpoints"):
        return latest(p / "checkpoints")
    raise UserError(f"trainer.resume={r}: not a checkpoint (no meta.json); valid: auto, never, "
                    "a step_N folder, a checkpoints/ folder or a run dir")


def save(engine, cfg: Config, state: dict, tokenizer_path: Path, *, rank: int, report=None) -> Path | None:
    """Save on every rank (each writes its shard). `report(dir, name)` hands the folder to Ray
    Train; without it the checkpoint is written straight into root(cfg)."""
    step_name = name(state["step"])
    if report is None:
        final = root(cfg) / step_name
        target = final.with_name(step_name + ".tmp")
        if rank == 0:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
    else:
        target = Path(tempfile.mkdtemp(prefix=f"sheepop-{step_name}-r{rank}-"))
    engine.save_checkpoint(str(target), tag=DS_TAG, save_latest=False)
    if rank == 0:
        (target / "config.yaml").write_text(yaml.safe_dump(redact(cfg), sort_keys=False))
        shutil.copy(tokenizer_path, target / "tokenizer.json")
        (target / "meta.json").write_text(json.dumps(state, indent=2))  # last: marks it complete
    if report is not None:
        report(target, step_name)
        shutil.rmtree(target, ignore_errors=True)
        return None
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        target.rename(final)
        prune(root(cfg), cfg.trainer.keep_checkpoints)
    return final


def prune(ckpt_root: Path, keep: int) -> None:
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def needs_universal(path: Path, world_size: int, zero_stage: int) -> bool:
    """ZeRO shards are laid out for the world size that saved them; another world size (or
    stage) must go through DeepSpeed's universal format."""
    meta = read_meta(path)
    saved_stage = meta.get("zero_stage", 0)
    if saved_stage == 0 and zero_stage == 0:
        return False  # stage 0 keeps full state in one file: any world size loads it
    return meta.get("world_size", 1) != world_size or saved_stage != zero_stage


def to_universal(path: Path, *, rank: int) -> Path:
    """Convert checkpoint `path` to DeepSpeed's universal format (once; rank 0 converts, all wait).

    The result goes beside the checkpoints (<root>/universal/step_N/ds), never into the checkpoint
    itself. Returns the folder to pass to engine.load_checkpoint(..., tag=DS_TAG)."""
    out = Path(path).parent.parent / "universal" / Path(path).name
    if rank == 0 and not (out / DS_TAG / "zero").is_dir():
        import subprocess
        import sys

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(Path(path) / DS_TAG), "--output_folder", str(tmp / DS_TAG),
                            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{r.stderr[-2000:]}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    torch.distributed.barrier()
    return out


def load(engine, path: Path, universal: Path | None = None) -> dict:
    """Restore engine state (weights, optimizer, scheduler) and return meta.json."""
    decay = [g.get("weight_decay") for g in engine.optimizer.param_groups]  # see compat.fix_zero3_universal_load
    load_path, _ = engine.load_checkpoint(str(universal or path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    compat.fix_zero3_universal_load(engine, decay)
    return read_meta(path)


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage and world size, without a process group."""
    ds_dir = Path(path) / DS_TAG
    if any(ds_dir.glob("*optim_states.pt")):
        import contextlib
        import io

        compat.before_deepspeed_import()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress chatter
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    else:  # stage 0: rank 0's model file holds the full weights and the optimizer
        states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
        masters = (states.get("optimizer") or {}).get("fp32_groups")
        if masters:  # DeepSpeed's bf16 mode: the module holds bf16 weights, the optimizer their fp32 master
            sd.update(_stage0_masters(path, masters))
    return {k: v.float() for k, v in sd.items()}


def _stage0_masters(path: Path, masters: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Name the stage-0 optimizer's fp32 master tensors: they follow the optimizer's groups."""
    from sheepop.model.transformer import Transformer
    from sheepop.train.engine import decay_split

    cfg = yaml.safe_load((Path(path) / "config.yaml").read_text())
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(cfg["model"]))
    names = [n for group in decay_split(model) for n in group]
    tensors = [t for group in masters for t in group]
    if len(names) != len(tensors):
        raise UserError(f"checkpoint {path}: {len(tensors)} master tensors for {len(names)} parameters")
    return dict(zip(names, tensors))


def load_model(run_or_ckpt: str | Path):
    """(model, tokenizer, meta) from a run dir, a checkpoint folder, or the model.pt that
    `sheepop export format=pt` wrote (plain torch weights: no DeepSpeed involved), for generate/eval/export."""
    from sheepop.data.tokenizer import load as load_tokenizer
    from sheepop.model.transformer import Transformer

    p = Path(run_or_ckpt).expanduser()
    if p.is_file():
        saved = torch.load(p, map_location="cpu", weights_only=True)
        model = Transformer(ModelConfig.from_dict(saved["config"]["model"]))
        model.load_state_dict(saved["model"])
        model.eval()
        return model, load_tokenizer(p.with_name("tokenizer.json")), {
            "step": saved["step"], "path": str(p), "config": saved["config"]}
    ckpt = p if (p / "meta.json").is_file() else latest(p / "checkpoints") or latest(p)
    if ckpt is None:
        raise UserError(f"run.dir={p}: no checkpoint found (expected {p}/checkpoints/step_N/meta.json)")
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    model = Transformer(ModelConfig.from_dict(cfg["model"]))
    sd = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Tied weights appear under one name only; anything else missing is a real mismatch.
    if unexpected or [k for k in missing if k != "head.weight"]:
        raise UserError(f"checkpoint {ckpt} does not match model {cfg['model']['name']}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model, load_tokenizer(ckpt / "tokenizer.json"), {**read_meta(ckpt), "path": str(ckpt), "config": cfg}

