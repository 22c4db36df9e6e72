"""Checkpoints: save and load an engine's state, the universal format, weights for generate/eval.

Where they live and when one counts is checkpoint_files.py. Saving: every rank writes its
DeepSpeed shard to a local folder, rank 0 adds meta.json, config.yaml and tokenizer.json, and
each rank's manifest (done/rank_R.json) goes up last. Without Ray a local checkpoint is written
in place (step_N.tmp, renamed when complete) and a remote one is uploaded in the background;
with Ray, each rank hands its folder to Ray Train, which uploads it asynchronously (the step
after a save does not wait for the upload) through checkpoint_files.upload.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch
import yaml

from sheepop import compat, storage
from sheepop.config import Config, redact
from sheepop.errors import UserError
from sheepop.model.config import ModelConfig
from sheepop.train.checkpoint_files import (DS_TAG, latest, list_checkpoints, localize, name, problem, prune, read_meta,
                                            root, run_storage, upload, write_marker)

__all__ = ["DS_TAG", "latest", "list_checkpoints", "name", "read_meta", "root", "run_storage", "resolve_resume",
           "save", "load", "universal_location",
           "needs_universal", "check_stage_change", "to_universal", "consolidated_state_dict", "find", "load_model", "Uploads",
           "check_hf", "load_hf"]


class Uploads:
    """Background uploads of a rank's checkpoints when no Ray Train is there to do it (cluster=process
    with an object store): one at a time, in order; wait() before the process ends."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, local: Path, ckpt: str, rank: int, after=None, beside_training: bool = False) -> None:
        """Manifest (sha256 of each file), upload, manifest last, then after(); in a thread
        (beside_training: training goes on meanwhile, checkpoint_files.upload)."""
        self.wait()

        def run() -> None:
            try:
                write_marker(local, rank)
                upload(local, ckpt, beside_training=beside_training)
                if after is not None:
                    after()
            except BaseException as e:  # re-raised on the training thread at the next wait()
                self._error = e
            finally:
                shutil.rmtree(local, ignore_errors=True)

        self._thread = threading.Thread(target=run, name=f"upload-{storage.name(ckpt)}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e


def resolve_resume(cfg: Config, log=None) -> str | None:
    """The checkpoint trainer.resume asks for: auto → newest complete one of this run, never → None,
    else a step_N folder, a checkpoints/ folder or a run's storage (local or a URI). The driver
    calls this; ranks get its answer in the run plan."""
    r = cfg.trainer.resume
    if r == "never":
        return None
    if r == "auto":
        return latest(root(cfg), log)
    loc = storage.normalize(r)
    storage.check_readable(loc, "trainer.resume")
    valid = ("valid: auto, never, a step_N folder, a checkpoints/ folder or a run dir (local or a storage URI)")
    if not storage.is_uri(loc) and Path(loc).is_file():
        raise UserError(f"trainer.resume={r}: a file, not a checkpoint folder; {valid}")
    if storage.is_file(storage.join(loc, "meta.json")):
        why = problem(loc)  # named explicitly: refused now, not after the workers have started
        if why is not None:
            raise UserError(f"trainer.resume={r}: {why}; give an intact checkpoint (trainer.resume=auto takes "
                            f"the newest intact one)")
        return loc
    for folder in (loc, storage.join(loc, "checkpoints")):
        found = latest(folder, log)
        if found:
            return found
    raise UserError(f"trainer.resume={r}: not a checkpoint (no complete step_N/meta.json there); {valid}")


def estimated_bytes(cfg: Config) -> int:
    """What one checkpoint of this model takes on disk, all ranks together: weights plus the fp32
    master and Adam moments (at most 4 + 12 bytes a parameter), and a little for the rest."""
    from sheepop.model.transformer import num_params

    return num_params(cfg.model) * 16 + 2**20


_last_bytes: dict[int, int] = {}  # rank → size of its last saved checkpoint (the best estimate of the next)


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or would, once created)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


RAM_STAGING = Path("/dev/shm")  # tmpfs on Linux: files there never reach a disk


def staging_dir(cfg: Config) -> Path:
    """Where a checkpoint bound for object storage is written before its upload (and deleted after).

    auto: RAM (/dev/shm) when it has room for this machine's checkpoint twice over plus 1 GiB, else
    the temp dir. A file written to disk and deleted seconds later still costs the kernel's writeback
    and, on a disk mounted with `discard`, a TRIM at the delete (bench/checkpoint_upload.py, model=tiny:
    the step after a save 1.05x a normal one staged in RAM, 1.20-1.31x on disk; docs/cluster.md)."""
    if cfg.cluster.checkpoint_staging != "auto":
        return Path(cfg.cluster.checkpoint_staging).expanduser()
    need = 2 * estimated_bytes(cfg) + 2**30
    try:
        if RAM_STAGING.is_dir() and os.access(RAM_STAGING, os.W_OK) and \
                min(shutil.disk_usage(RAM_STAGING).free, _memory_available()) >= need:
            return RAM_STAGING
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def _remove_orphans(staging: Path) -> None:
    """Staged checkpoints of processes that died before their upload finished (in RAM they would
    hold memory until a reboot)."""
    for d in staging.glob("sheepop-step_*-r*-p*-*"):
        try:
            pid = int(d.name.split("-p", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass  # not ours, or another user's live process


def _memory_available() -> int:
    """MemAvailable (tmpfs pages are RAM: its nominal size can exceed what is free)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def check_space(where: Path, need: int, what: str) -> None:
    from sheepop.units import human

    free = free_bytes(where)
    if free < need:
        raise UserError(f"not enough disk space for {what}: {where} has {human(free, 'B')} free, a checkpoint "
                        f"needs about {human(need, 'B')}; free some space or save elsewhere (run.dir, "
                        "cluster.storage_path); the last complete checkpoint stays the resume point")


def save(engine, cfg: Config, state: dict, tokenizer_path: Path, *, rank: int, report=None,
         uploads: Uploads | None = None) -> str:
    """Save on every rank (each writes its shard); returns the checkpoint's location.

    report(dir, name): Ray Train's hand-off (it uploads dir, manifest last, in the background).
    Without Ray: a local checkpoint is written in place; a remote one goes up through `uploads`."""
    step_name = name(state["step"])
    ckpt = storage.join(root(cfg), step_name)
    in_place = report is None and not storage.is_uri(ckpt)
    if in_place:
        final = storage.local_path(ckpt)
        local = final.with_name(step_name + ".tmp")
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
    else:
        staging = staging_dir(cfg)
        staging.mkdir(parents=True, exist_ok=True)
        _remove_orphans(staging)
        local = Path(tempfile.mkdtemp(prefix=f"sheepop-{step_name}-r{rank}-p{os.getpid()}-", dir=staging))
    need = _last_bytes.get(rank) or estimated_bytes(cfg) // max(1, torch.distributed.get_world_size())
    try:
        check_space(local, need, f"checkpoint {step_name}")
        engine.save_checkpoint(str(local), tag=DS_TAG, save_latest=False)
    except UserError:
        shutil.rmtree(local, ignore_errors=True)
        raise
    except (OSError, RuntimeError):  # torch's serializer says "unexpected pos ..." when the disk fills up
        shutil.rmtree(local, ignore_errors=True)  # never a half-written checkpoint; the last good one stays
        if free_bytes(local.parent) > 64 * 2**20:
            raise
        from sheepop.units import human

        raise UserError(f"saving checkpoint {step_name} to {local} failed: the disk is full "
                        f"({human(free_bytes(local.parent), 'B')} free, about {human(need, 'B')} needed); free "
                        "some space or save elsewhere; the last complete checkpoint stays the resume point") from None
    _last_bytes[rank] = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    if rank == 0:
        (local / "config.yaml").write_text(yaml.safe_dump(redact(cfg), sort_keys=False))
        shutil.copy(tokenizer_path, local / "tokenizer.json")
        (local / "meta.json").write_text(json.dumps(state, indent=2))
    if report is not None:  # Ray Train uploads (checkpoint_files.upload: the manifest is made there)
        report(local, step_name)
        return ckpt
    keep = cfg.trainer.keep_checkpoints
    if in_place:
        write_marker(local, rank)
        shutil.rmtree(final, ignore_errors=True)
        local.rename(final)
        prune(root(cfg), keep)
        return ckpt
    uploads = uploads or Uploads()
    uploads.submit(local, ckpt, rank, after=lambda: prune(root(cfg), keep),
                   beside_training=cfg.cluster.checkpoint_upload == "async")
    if cfg.cluster.checkpoint_upload == "sync":
        uploads.wait()
    return ckpt


def needs_universal(ckpt: str | Path, world_size: int, zero_stage: int) -> bool:
    """ZeRO shards are laid out for the world size that saved them; another world size (or
    stage) must go through DeepSpeed's universal format."""
    meta = read_meta(ckpt)
    saved_stage = meta.get("zero_stage", 0)
    if saved_stage == 0 and zero_stage == 0:
        return False  # stage 0 keeps full state in one file: any world size loads it
    return meta.get("world_size", 1) != world_size or saved_stage != zero_stage


# ZeRO stages between which DeepSpeed 0.19's universal checkpoint converts. Its zero/optimizer_state.pt
# holds the saving optimizer's own global state, and stages 1-2 (stage_1_and_2.py) and 3 (stage3.py)
# each read only their own layout; stage 0 saves no ZeRO optimizer files to convert at all.
STAGE_FAMILIES = ({0}, {1, 2}, {3})


def check_stage_change(ckpt: str, zero_stage: int) -> None:
    """Refuse, in one line, a resume at a ZeRO stage this checkpoint cannot be converted to."""
    saved = read_meta(ckpt).get("zero_stage", 0)
    family = next(f for f in STAGE_FAMILIES if saved in f)
    if zero_stage not in family:
        names = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
        valid = " or ".join(f"parallelism={names[s]}" for s in sorted(family))
        raise UserError(f"parallelism.zero_stage={zero_stage}: checkpoint {ckpt} was saved at ZeRO stage {saved}, "
                        f"which DeepSpeed cannot convert to stage {zero_stage}; resume with {valid}, or start a new "
                        f"run from its weights (sheepop export run.dir=... format=hf out=DIR, then "
                        f"trainer.init_from=hf:DIR)")


def universal_location(ckpt: str, run: str) -> str:
    """In the storage of the run that resumes (run: checkpoint_files.run_storage), never inside the
    checkpoint nor in another run: <run>/universal/step_N for one of its own checkpoints,
    step_N-from-<hash of the source> for another run's (a branch: the source run may be read-only,
    someone else's bucket, and is left as it was)."""
    import hashlib

    ckpt, run = storage.normalize(ckpt), storage.normalize(run)
    step = storage.name(ckpt)
    if ckpt.rsplit("/", 1)[0] != storage.join(run, "checkpoints"):
        step += "-from-" + hashlib.sha256(ckpt.encode()).hexdigest()[:10]
    return storage.join(run, "universal", step)


def to_universal(ckpt: str, run: str) -> str:
    """Convert a checkpoint to DeepSpeed's universal format once, into the resuming run's storage
    (the driver does it, before any rank starts); returns the location to load from
    (engine.load_checkpoint(..., tag=DS_TAG))."""
    import subprocess
    import sys

    out = universal_location(ckpt, run)
    if storage.is_file(storage.join(out, "done", "rank_0.json")):
        return out
    source = localize(ckpt)  # all files: the conversion reads every rank's shards
    local_out = storage.cache_dir(out) if storage.is_uri(out) else storage.local_path(out)
    tmp = local_out.with_name(local_out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                        "--input_folder", str(source / DS_TAG), "--output_folder", str(tmp / DS_TAG),
                        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{r.stderr[-2000:]}")
    for f in ("meta.json", "config.yaml", "tokenizer.json"):
        if (source / f).is_file():
            shutil.copy(source / f, tmp / f)
    write_marker(tmp, 0)
    shutil.rmtree(local_out, ignore_errors=True)
    tmp.rename(local_out)
    if storage.is_uri(out):
        upload(local_out, out)
    return out


def load(engine, ckpt: str, rank: int, universal: str | None = None) -> dict:
    """Restore engine state (weights, optimizer, scheduler) on this rank and return meta.json.
    A remote checkpoint is downloaded first: only this rank's files (all of the universal form)."""
    local = localize(universal) if universal else localize(ckpt, rank)
    decay = [g.get("weight_decay") for g in engine.optimizer.param_groups]  # see compat.fix_zero3_universal_load
    load_path, _ = engine.load_checkpoint(str(local), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {ckpt}")
    compat.fix_zero3_universal_load(engine, decay)
    return read_meta(ckpt)


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


def check_hf(cfg: Config, *, training: bool = True) -> None:
    """The driver's check of trainer.init_from=hf:DIR before any rank starts: every tensor's name and
    shape (from the safetensors headers, no weights read) and the tokenizer against the model (for
    training, also the document separator the data pipeline needs; generation does without it)."""
    from sheepop.data import tokenizer as toklib
    from sheepop.model.hf import from_hf_state_dict, init_from_folder, read_safetensors

    folder = init_from_folder(cfg.trainer.init_from)
    from_hf_state_dict(read_safetensors(folder, shapes_only=True), cfg.model, where=str(folder))
    path = cfg.tokenizer.path
    toklib.check_file(path, "tokenizer.path")
    tok = toklib.load(path)
    if tok.get_vocab_size() > cfg.model.vocab_size:  # token ids past the embedding table
        raise UserError(f"tokenizer.path={path} has {tok.get_vocab_size()} tokens, more than the model's vocab_size="
                        f"{cfg.model.vocab_size} ({folder}/config.json); valid: the model's own tokenizer.json")
    if training:  # the data pipeline ends every document with it
        toklib.eot_id(tok, cfg.tokenizer.eot)


def load_hf(model: torch.nn.Module, folder: str | Path) -> None:
    """Load a Hugging Face Llama folder's weights into a model of its shape (trainer.init_from at a fresh
    start, `sheepop import`); sheepop.model.hf holds the mapping and its checks."""
    from sheepop.model.hf import from_hf_state_dict, read_safetensors

    sd = from_hf_state_dict(read_safetensors(Path(folder)), model.args, where=str(folder))
    with torch.no_grad():
        model.load_state_dict(sd)  # strict, and copy_ casts bf16/fp16 files to the model's dtype


def find(run_or_ckpt: str | Path, log=None) -> str | None:
    """The checkpoint a run dir, a checkpoints/ folder or a step_N folder names (local or URI);
    each newer checkpoint skipped as incomplete or damaged is reported through log()."""
    loc = storage.normalize(run_or_ckpt)
    if storage.is_file(storage.join(loc, "meta.json")):
        return loc
    return latest(storage.join(loc, "checkpoints"), log) or latest(loc, log)


def _notice(line: str) -> None:
    print(f"sheepop: {line}", file=sys.stderr)


def load_model(run_or_ckpt: str | Path, log=_notice):
    """(model, tokenizer, meta) from a run dir, a checkpoint folder (local or in storage), or the
    model.pt that `sheepop export format=pt` or `sheepop import` wrote (plain torch weights: no
    DeepSpeed involved; its folder names it too when it holds no checkpoint), for generate/eval/export.
    A newer checkpoint that is damaged or incomplete is skipped with a line through log()."""
    from sheepop.data.tokenizer import load as load_tokenizer
    from sheepop.model.transformer import Transformer

    storage.check_readable(str(run_or_ckpt), "run.dir")  # in storage: one line if it cannot be read
    p = None if storage.is_uri(run_or_ckpt) else storage.local_path(run_or_ckpt)
    found = None if p is not None and p.is_file() else find(run_or_ckpt, log)
    if p is not None and found is None and (p / "model.pt").is_file():
        p = p / "model.pt"
    if p is not None and p.is_file():
        saved = torch.load(p, map_location="cpu", weights_only=True)
        model = Transformer(ModelConfig.from_dict(saved["config"]["model"]))
        model.load_state_dict(saved["model"])
        model.eval()
        return model, load_tokenizer(p.with_name("tokenizer.json")), {
            "step": saved["step"], "path": str(p), "local": str(p.parent), "config": saved["config"]}
    if found is None:
        raise UserError(f"run.dir={run_or_ckpt}: no checkpoint found (none complete; expected "
                        f"{run_or_ckpt}/checkpoints/step_N/meta.json)")
    ckpt = localize(found)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    model = Transformer(ModelConfig.from_dict(cfg["model"]))
    sd = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Tied weights appear under one name only; anything else missing is a real mismatch.
    if unexpected or [k for k in missing if k != "head.weight"]:
        raise UserError(f"checkpoint {found} does not match model {cfg['model']['name']}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return model, load_tokenizer(ckpt / "tokenizer.json"), {**read_meta(ckpt), "path": str(found), "local": str(ckpt),
                                                            "config": cfg}
