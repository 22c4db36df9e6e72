"""Where checkpoints live and when one counts: layout, per-rank manifests, listing, verification.

  <run storage>/checkpoints/step_000100/
      ds/                 DeepSpeed engine state: weights, optimizer (one shard per rank), scheduler
      meta.json           step, world size, ZeRO stage, W&B run id, tokens seen   (rank 0)
      config.yaml         the resolved config (secrets redacted)                  (rank 0)
      tokenizer.json                                                              (rank 0)
      done/rank_R.json    rank R's manifest: each file it wrote with size and sha256, written
                          only once all of them are in storage
  <run storage>/universal/step_000100/   the universal-format copy, made when a resume needs it

<run storage> is `cluster.storage_path/<run.name>` when storage_path is set (a folder every node
sees, or an object store: s3://, gs://, ...), else run.dir. A checkpoint counts once meta.json and
the manifest of every rank are there (complete) and every listed file has its listed size
(intact); anything else is skipped, in one line saying why. Checkpoints written before manifests
existed are accepted after a size check.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

from sheepop import storage
from sheepop.config import Config

DS_TAG = "ds"
DONE = "done"
STEP_DIR = re.compile(r"^step_(\d+)$")


def run_storage(cfg: Config) -> str:
    """Where this run's checkpoints and mirrored files go: storage_path/<run.name>, else run.dir."""
    sp = cfg.cluster.storage_path
    return storage.normalize(storage.join(sp, cfg.run.name) if sp else cfg.run.dir)


def root(cfg: Config) -> str:
    return storage.join(run_storage(cfg), "checkpoints")


def name(step: int) -> str:
    return f"step_{step:06d}"


def marker(rank: int) -> str:
    return f"{DONE}/rank_{rank}.json"


def read_meta(ckpt: str | Path) -> dict:
    return json.loads(storage.read_text(storage.join(ckpt, "meta.json")))


def list_checkpoints(ckpt_root: str | Path) -> list[str]:
    """Checkpoint folders (step_N), oldest first, finished or not: problem() says which count."""
    found = [(int(m.group(1)), storage.join(ckpt_root, entry))
             for entry in storage.listdir(ckpt_root) if (m := STEP_DIR.match(entry))]
    return [p for _, p in sorted(found)]


def manifest(local_dir: Path, files: list[str]) -> dict:
    """{"files": {relative path: [size, sha256]}} of files in a local folder."""
    return {"files": {f: [(local_dir / f).stat().st_size, storage.sha256_file(local_dir / f)] for f in sorted(files)}}


def rank_manifests(ckpt: str | Path) -> dict[int, dict] | None:
    """{rank: manifest} of a complete checkpoint; None for one written before manifests existed."""
    meta = read_meta(ckpt)
    files = storage.sizes(ckpt)
    if not any(f.startswith(DONE + "/") for f in files):
        return None
    return {r: json.loads(storage.read_text(storage.join(ckpt, marker(r))))
            for r in range(meta.get("world_size", 1)) if marker(r) in files}


def problem(ckpt: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (incomplete, truncated, missing files), or None."""
    files = storage.sizes(ckpt)
    if "meta.json" not in files:
        return "no meta.json (the save did not finish)"
    meta = read_meta(ckpt)
    world = meta.get("world_size", 1)
    if not any(f.startswith(DONE + "/") for f in files):  # an older sheepop's checkpoint: sizes only
        shards = {f: s for f, s in files.items() if f.startswith(DS_TAG + "/")}
        if not shards:
            return f"no {DS_TAG}/ folder (no DeepSpeed state)"
        empty = [f for f, s in shards.items() if s == 0]
        return f"{empty[0]} is empty" if empty else None
    missing = [r for r in range(world) if marker(r) not in files]
    if missing:
        return f"incomplete: rank {missing[0]} of {world} has not finished writing its files ({marker(missing[0])} missing)"
    for r, m in rank_manifests(ckpt).items():
        for f, (size, _sha) in m["files"].items():
            if f not in files:
                return f"{f} (rank {r}) is missing"
            if files[f] != size:
                return f"{f} (rank {r}) is {files[f]} bytes, its manifest says {size}"
    return None


def latest(ckpt_root: str | Path, log=None) -> str | None:
    """The newest complete, intact checkpoint; each newer one skipped is reported through log()."""
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        why = problem(ckpt)
        if why is None:
            return ckpt
        if log is not None:
            log(f"skipping checkpoint {ckpt}: {why}")
    return None


def rank_files(ckpt: str | Path, rank: int) -> list[str] | None:
    """The files rank `rank` loads from a checkpoint saved by the same world size: its own and
    rank 0's shared ones (config, tokenizer, the stage 0-2 model states); None = all of them."""
    manifests = rank_manifests(ckpt)
    if manifests is None:
        return None
    mine = set(manifests.get(rank, {"files": {}})["files"])
    for f in manifests.get(0, {"files": {}})["files"]:
        if "zero_pp_rank_0_" not in f:  # rank 0's own ZeRO shards stay with rank 0
            mine.add(f)
    return sorted(mine | {"meta.json"} | {marker(r) for r in manifests})


def write_marker(local_dir: Path, rank: int) -> None:
    """Rank `rank`'s manifest of everything in local_dir (before upload)."""
    files = [str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file()]
    out = local_dir / marker(rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest(local_dir, [f for f in files if not f.startswith(DONE + "/")])))


def upload(local_dir: Path, ckpt: str, beside_training: bool = False) -> None:
    """Copy one rank's checkpoint files to storage, its manifest last (what makes them count).

    beside_training (an asynchronous upload, in a thread of its own, to object storage): the thread
    drops to the lowest CPU priority and writes every part itself, so the upload takes only the CPU
    time training leaves. Measured 2026-12-07 (bench/checkpoint_upload.py model=small, one training
    core): the step after a save 1.77x a normal step before, 1.04x after (thread priority alone:
    1.66x; pyarrow's I/O threads did the work at training's priority)."""
    files = [str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file()]
    markers = [f for f in files if f.startswith(DONE + "/")]
    yield_cpu = beside_training and storage.is_uri(ckpt)  # a local copy is cheap: left as it is
    if yield_cpu and sys.platform == "linux":  # PRIO_PROCESS with a thread id is this thread on Linux only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    try:
        storage.upload(local_dir, ckpt, [f for f in files if f not in markers], in_this_thread=yield_cpu)
        storage.upload(local_dir, ckpt, markers, in_this_thread=yield_cpu)
    except OSError as e:
        if not storage.is_uri(ckpt):
            raise
        from sheepop.errors import UserError

        # One line for the user; the checkpoint stays incomplete (no manifest), so no resume takes it.
        raise UserError(f"checkpoint {ckpt}: upload failed ({storage.refusal(str(e), 'write')}); the newest complete "
                        f"checkpoint stays the resume point: trainer.resume=auto continues from it once the "
                        f"storage answers again") from None


def localize(ckpt: str, rank: int | None = None) -> Path:
    """A local folder holding what `rank` needs of a checkpoint (all of it for rank=None), its
    files checked against their manifests (size and sha256). A local checkpoint is used in place."""
    from sheepop.errors import UserError

    checked: set[str] = set()  # cached files already matched to their manifest
    if not storage.is_uri(ckpt):
        local = storage.local_path(ckpt)
        wanted = None
    else:
        local = storage.cache_dir(ckpt)
        wanted = rank_files(ckpt, rank) if rank is not None else None
        files = wanted if wanted is not None else list(storage.sizes(ckpt))
        markers = [f for f in files if f.startswith(DONE + "/")]
        for old in (local / DONE).glob("rank_*.json") if (local / DONE).is_dir() else []:
            if f"{DONE}/{old.name}" not in markers:
                old.unlink()  # a rank of an earlier save here that this one does not have
        storage.download(ckpt, local, markers)  # always fresh: they say what the other files must be
        expected = {f: tuple(v) for m in _local_manifests(local).values() for f, v in m["files"].items()}

        def still_good(f: str, p: Path) -> bool:
            """A cached file counts only with its manifest's size and sha256: the same step saved
            again at this URI (a new run of the same name, a restart's re-save) has files of the
            same sizes and other bytes."""
            if f in expected and p.stat().st_size == expected[f][0] and storage.sha256_file(p) == expected[f][1]:
                checked.add(f)
                return True
            return False

        storage.download(ckpt, local, [f for f in files if f not in markers], keep=still_good)
    manifests = _local_manifests(local)
    for r, m in manifests.items():
        for f, (size, sha) in m["files"].items():
            if wanted is not None and f not in wanted:
                continue
            if (rank is not None and r not in (rank, 0)) or f in checked:
                continue
            p = local / f
            if not p.is_file() or p.stat().st_size != size or storage.sha256_file(p) != sha:
                raise UserError(f"checkpoint {ckpt}: {f} does not match its manifest (size or sha256); "
                                "resume from another checkpoint (trainer.resume=PATH) or delete this one")
    return local


def _local_manifests(local: Path) -> dict[int, dict]:
    out = {}
    for p in sorted((local / DONE).glob("rank_*.json")) if (local / DONE).is_dir() else []:
        out[int(p.stem.split("_")[1])] = json.loads(p.read_text())
    return out


def prune(ckpt_root: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and unfinished leftovers older
    than the newest complete one (a save still being uploaded is newer, so it stays)."""
    if keep <= 0:
        return
    found = list_checkpoints(ckpt_root)
    good = [c for c in found if problem(c) is None]
    for old in good[:-keep]:
        storage.remove(old)
    if good:
        newest = good[-1]
        for c in found:
            if c not in good and step_of(c) < step_of(newest):
                storage.remove(c)


def step_of(ckpt: str | Path) -> int:
    """N of a step_N checkpoint folder."""
    return int(STEP_DIR.match(storage.name(ckpt)).group(1))
