"""`prepare`: raw files → curated, deduplicated, tokenized shards + manifest.json.

Layout of data.out_dir:
  manifest.json        documents, bytes, tokens, shard checksums, tokenizer hash, funnel,
                       skipped files and removed-document examples (see docs/data.md)
  tokenizer.json       the tokenizer the shards were made with
  train_000000.bin     flat token ids (uint16 when the vocabulary fits, else uint32),
  val_000000.bin       <|endoftext|> after every document

A second call with the same inputs (same files, sizes, mtimes, data and tokenizer config)
returns the existing manifest without touching anything. The work happens in
data.out_dir + '.tmp', which replaces the old folder only when complete, under a file lock,
so concurrent callers (several Ray workers on one node) prepare once; after a crash, the
next call resumes from what that folder holds (see pipeline.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock

from sheepop import storage
from sheepop.data import ingest, tokenizer as toklib
from sheepop.data.pipeline import MANIFEST_VERSION, build
from sheepop.errors import UserError

# Settings that change how fast the shards are made, or how training reads them, never what they hold.
NOT_CONTENT = ("out_dir", "num_workers", "document_mask", "mixture")


def fingerprint(cfg) -> str:
    """Hash of everything that decides the shards' content (cfg: a Config or its plain dict)."""
    cfg = _plain(cfg)
    data = {k: v for k, v in cfg["data"].items() if k not in NOT_CONTENT}
    tok = dict(cfg["tokenizer"])
    if tok.get("eot") == toklib.EOT:  # the default: data prepared before the field existed stays valid
        del tok["eot"]
    path = tok.pop("path") if tok.get("path") else None  # a given tokenizer counts by its content, not its path
    h = hashlib.sha256(json.dumps([MANIFEST_VERSION, data, tok], sort_keys=True).encode())
    if path:
        if not Path(path).is_file():
            raise UserError(f"tokenizer.path={path}: no such file; give a tokenizer.json or leave it empty")
        toklib.check_file(path, "tokenizer.path")
        h.update(toklib.file_hash(path).encode())
    for p in ingest.list_files(cfg["data"]):
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"data.out_dir={out_dir}: no manifest.json; run `sheepop prepare` first")
    return json.loads(path.read_text())


def _plain(cfg) -> dict:
    """The pipeline works on plain dicts: they are what it pickles to Ray Data actors and hashes."""
    if isinstance(cfg, dict):
        return cfg
    from sheepop.config import to_dict

    return to_dict(cfg)


def local_dir(out_dir: str | Path) -> Path:
    """Where prepared data is read on this machine: data.out_dir, or its local cache when it is a URI."""
    return storage.cache_dir(out_dir) if storage.is_uri(out_dir) else Path(out_dir)


def prepare(cfg, log=print, progress: bool | None = None, _check: bool = True) -> dict:
    """Prepare data.* with tokenizer.* of a Config into data.out_dir (or reuse it); returns the manifest.

    data.out_dir may be an object-store URI: the data is prepared in the local cache and uploaded,
    manifest.json last; a URI that already holds a matching manifest is used as it is. Only the
    driver (and `sheepop prepare`) calls this; training workers verify what it made
    (verify_prepared) and never prepare. progress: rich bars per stage (None: when stderr is a terminal).
    """
    cfg = _plain(cfg)
    if storage.is_uri(cfg["data"]["out_dir"]):
        return _prepare_in_storage(cfg, log, progress)
    out = Path(cfg["data"]["out_dir"]).expanduser()
    if _check:  # not for the local cache of a data.out_dir in storage: sheepop's own folder
        check_out_dir(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    with FileLock(str(out) + ".lock"):
        if (out / "manifest.json").is_file():
            manifest = json.loads((out / "manifest.json").read_text())
            if manifest.get("fingerprint") == fp:
                return manifest
            log(f"inputs changed since {out} was prepared: preparing again")
        work = out.with_name(out.name + ".tmp")
        state = work / "state.json"
        if not (state.is_file() and json.loads(state.read_text()).get("fingerprint") == fp):
            shutil.rmtree(work) if work.is_dir() else work.unlink(missing_ok=True)
            work.mkdir(parents=True)
            state.write_text(json.dumps({"fingerprint": fp}))
        else:
            log(f"resuming the unfinished preparation in {work}")
        manifest = build(cfg, work, fp, log, progress)
        for leftover in ("units", "curated.pkl", "state.json"):  # work files: not part of the output
            p = work / leftover
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        # The old folder moves aside in one rename, so no moment leaves a half-deleted one behind
        # (which the check above would then take for someone else's files).
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        if out.exists():
            out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def check_out_dir(cfg) -> None:
    """Refuse, before any work, a data.out_dir that preparing would wrongly replace: a file, a folder
    of other files (no manifest.json: preparing replaces the whole folder), one that is or holds the
    inputs; in object storage a bucket's root or a prefix of other objects."""
    from sheepop import output_paths

    cfg = _plain(cfg)
    raw = cfg["data"]["out_dir"]
    if storage.is_uri(raw):  # a prefix of other objects (preparing writes its shards among them)
        uri = storage.normalize(raw)
        if "/" not in uri.split("://", 1)[1].strip("/"):
            raise UserError(f"data.out_dir={raw}: a bucket's root; give a prefix inside it (e.g. {uri.rstrip('/')}/data/NAME)")
        names = storage.listdir(uri)
        other = [n for n in names if not _ours(n)]  # an interrupted upload leaves only ours
        if other and "manifest.json" not in names:
            raise UserError(f"data.out_dir={raw} holds other objects ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) "
                            f"but no manifest.json: it is not prepared data; give a new or empty prefix")
        return
    inputs = ((ingest.stdlib_root(),) if cfg["data"]["source"] == "stdlib"
              else tuple(_literal_root(str(p)) for p in cfg["data"].get("paths") or ()))
    out = output_paths.check(raw, "data.out_dir", kind="folder", force=True,
                             keep=tuple((p, "the input data.paths") for p in inputs))
    if out.is_dir() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise UserError(f"data.out_dir={raw} holds files that are not prepared data (no manifest.json), and "
                        f"preparing replaces the whole folder; give a new or empty folder")


def _ours(name: str) -> bool:
    """A file name that preparing writes into data.out_dir."""
    import re

    return name in ("manifest.json", "tokenizer.json") or re.fullmatch(r"(train|val)_\d+\.bin", name) is not None


def _literal_root(spec: str) -> Path:
    """The folder a data.paths entry lies in up to its first wildcard (the entry itself if none)."""
    spec = os.path.expanduser(spec)
    wild = min((i for i in (spec.find(c) for c in "*?[") if i >= 0), default=-1)
    return Path(spec if wild < 0 else spec[:spec.rfind("/", 0, wild) + 1] or ".")


def _prepare_in_storage(cfg: dict, log, progress) -> dict:
    uri = storage.normalize(cfg["data"]["out_dir"])
    check_out_dir(cfg)
    fp = fingerprint(cfg)
    try:
        found = json.loads(storage.read_text(storage.join(uri, "manifest.json")))
        if found.get("fingerprint") == fp:
            storage.download(uri, local_dir(uri), ["tokenizer.json"])  # the driver needs it, not the shards
            return found
        log(f"inputs changed since {uri} was prepared: preparing again")
    except (OSError, ValueError):
        pass
    local = local_dir(uri)
    manifest = prepare({**cfg, "data": {**cfg["data"], "out_dir": str(local)}}, log, progress, _check=False)
    files = ["tokenizer.json"] + [s["file"] for sp in manifest["splits"].values() for s in sp["shards"]]
    log(f"uploading {len(files)} files to {uri}")
    storage.upload(local, uri, files)
    storage.upload(local, uri, ["manifest.json"])  # last: what makes the upload count
    return manifest


def verify_prepared(out_dir: str | Path, manifest: dict, where: str = "") -> Path:
    """Check, on a training worker, that data.out_dir holds the data the driver prepared: the same
    manifest fingerprint and every shard at its recorded size; returns the local folder to read.
    One UserError line otherwise; a worker never runs the curation pipeline itself (it could take
    hours, on every node). With data.out_dir in storage, this node's cache is filled first and
    every file it downloads is checked against the manifest's sha256."""
    if storage.is_uri(out_dir):
        _fill_cache(storage.normalize(out_dir), manifest, where)
    out = local_dir(out_dir)
    here = f" on {where}" if where else ""
    path = out / "manifest.json"
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"data.out_dir={out}: no prepared data{here} (no readable manifest.json); training "
                        "workers do not prepare data: put data.out_dir on storage every node sees, or run "
                        "`sheepop prepare` with the same data.out_dir on every node") from None
    if found.get("fingerprint") != manifest.get("fingerprint"):
        raise UserError(f"data.out_dir={out}{here} holds other data (fingerprint {found.get('fingerprint')}, the "
                        f"driver prepared {manifest.get('fingerprint')}); valid: the same prepared folder on every node")
    import numpy as np

    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            f = out / shard["file"]
            size = f.stat().st_size if f.is_file() else -1
            expected = shard["tokens"] * itemsize
            if size != expected:
                raise UserError(f"data.out_dir={out}{here}: shard {shard['file']} is "
                                + ("missing" if size < 0 else f"{size} bytes, the manifest says {expected}")
                                + "; prepare the data again (`sheepop prepare`)")
    return out


def _fill_cache(uri: str, manifest: dict, where: str) -> None:
    """Download into this node's cache what it lacks of the data at `uri` (under a lock: several
    workers of one node fill it once) and check each new file against the manifest."""
    import numpy as np

    local = local_dir(uri)
    local.mkdir(parents=True, exist_ok=True)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    shards = [s for sp in manifest["splits"].values() for s in sp["shards"]]
    with FileLock(str(local) + ".lock"):
        if not storage.is_file(storage.join(uri, "manifest.json")):
            raise UserError(f"data.out_dir={uri}: no manifest.json there (seen from {where or 'this node'}); "
                            "prepare it first (`sheepop prepare`); training workers do not prepare data")
        try:  # written after the last fill: what the shards here were prepared from
            cached = json.loads((local / "manifest.json").read_text()).get("fingerprint")
        except (OSError, ValueError):
            cached = None

        def fresh(s: dict) -> bool:
            """A shard here is the one in storage: the right size, and from the same preparation (data
            prepared again at this URI has shards of the same names and sizes) or its sha256."""
            p = local / s["file"]
            if not p.is_file() or p.stat().st_size != s["tokens"] * itemsize:
                return False
            same_preparation = cached is not None and cached == manifest.get("fingerprint")
            return same_preparation or storage.sha256_file(p) == s.get("sha256")

        missing = [s for s in shards if not fresh(s)]
        storage.download(uri, local, [s["file"] for s in missing] + ["tokenizer.json"])
        for s in missing:
            if "sha256" in s and storage.sha256_file(local / s["file"]) != s["sha256"]:
                (local / s["file"]).unlink()
                raise UserError(f"data.out_dir={uri}: {s['file']} does not match the manifest's sha256 after "
                                "download; prepare the data again (`sheepop prepare`)")
        (local / "manifest.json").write_text(json.dumps(manifest))
