"""`prepare`: corpus → tokenizer → pre-tokenized shards + manifest.json.

Layout of data.out_dir:
  manifest.json        documents, bytes, tokens, shard checksums, tokenizer hash, funnel
  tokenizer.json       the tokenizer the shards were made with
  train_000000.bin     flat token ids (uint16 when the vocabulary fits, else uint32),
  val_000000.bin       <|endoftext|> between documents

A second call with the same inputs (same files, sizes, mtimes, data and tokenizer config)
returns the existing manifest without touching anything. Writes go to a temporary folder
that replaces the old one only when complete, under a file lock, so concurrent callers
(several Ray workers on one node) prepare once.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from filelock import FileLock

from sheepop.data import sources, tokenizer as toklib
from sheepop.errors import UserError

MANIFEST_VERSION = 1
ENCODE_BATCH = 256  # documents per encode_batch call (the Rust side parallelises within it)


def fingerprint(cfg: dict) -> str:
    """Hash of everything that decides the shards' content."""
    data = {k: v for k, v in cfg["data"].items() if k not in ("out_dir", "num_workers")}
    tok = dict(cfg["tokenizer"])
    h = hashlib.sha256(json.dumps([MANIFEST_VERSION, data, tok], sort_keys=True).encode())
    if tok.get("path"):
        h.update(toklib.file_hash(tok["path"]).encode())
    for p in sources.list_files(cfg["data"]):
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def is_val(doc_id: str, fraction: float) -> bool:
    """Split by document, by a hash of its id: stable when other documents come and go."""
    return int(hashlib.md5(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"data.out_dir={out_dir}: no manifest.json; run `sheepop prepare` first")
    return json.loads(path.read_text())


def prepare(cfg: dict, log=print) -> dict:
    """Prepare cfg['data'] with cfg['tokenizer'] into data.out_dir (or reuse it); returns the manifest."""
    out = Path(cfg["data"]["out_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    with FileLock(str(out) + ".lock"):
        if (out / "manifest.json").is_file():
            manifest = json.loads((out / "manifest.json").read_text())
            if manifest.get("fingerprint") == fp:
                return manifest
            log(f"inputs changed since {out} was prepared: preparing again")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        manifest = _build(cfg, tmp, fp, log)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return manifest


def _build(cfg: dict, out: Path, fp: str, log) -> dict:
    t0 = time.time()
    data_cfg, tok_cfg = cfg["data"], cfg["tokenizer"]
    stats = sources.ReadStats()
    docs = list(sources.iter_documents(data_cfg, stats))
    if not docs:
        raise UserError(f"data (source={data_cfg['source']}): no documents to train on "
                        f"({stats.files} files read, skipped: {stats.skipped or 'none'})")
    split = {"train": [], "val": []}
    for d in docs:
        split["val" if is_val(d.id, data_cfg["val_fraction"]) else "train"].append(d)
    if not split["val"] or not split["train"]:  # tiny corpora: hold out the last document
        split["train"], split["val"] = docs[:-1] or docs, docs[-1:]
    log(f"read {len(docs)} documents, {stats.bytes / 1e6:.1f} MB ({len(split['val'])} for validation)")

    if tok_cfg.get("path"):
        tok = toklib.load(tok_cfg["path"])
    else:
        tok = toklib.train_bpe(_sample(split["train"], tok_cfg["train_bytes"]), tok_cfg["vocab_size"],
                               tok_cfg["special_tokens"])
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    eot = toklib.eot_id(tok)
    log(f"tokenizer: byte-level BPE, {vocab} tokens ({time.time() - t0:.1f}s)")

    splits = {}
    for name, part in split.items():
        shard_files, n_tokens = _write_shards(tok, part, eot, dtype, out, name, data_cfg["shard_tokens"])
        splits[name] = {"docs": len(part), "bytes": sum(len(d.text.encode()) for d in part),
                        "tokens": n_tokens, "shards": shard_files}
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "source": data_cfg["source"],
        "dtype": np.dtype(dtype).name,
        "documents": len(docs),
        "bytes": stats.bytes,
        "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
        "tokenizer": {"file": "tokenizer.json", "sha256_16": toklib.file_hash(out / "tokenizer.json"),
                      "vocab_size": vocab, "eot_id": eot},
        "splits": splits,
        "funnel": [{"stage": "read", "docs_in": stats.files, "docs_out": len(docs),
                    "bytes_in": stats.bytes, "bytes_out": stats.bytes}],
        "skipped": stats.skipped,
        "seconds": round(time.time() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"prepared {manifest['tokens']:,} tokens in {manifest['seconds']}s → {cfg['data']['out_dir']}")
    return manifest


def _sample(docs: list[sources.Document], max_bytes: int):
    """The first max_bytes of the training documents (the BPE trainer's input)."""
    seen = 0
    for d in docs:
        yield d.text
        seen += len(d.text)
        if max_bytes and seen >= max_bytes:
            return


def _write_shards(tok, docs, eot, dtype, out: Path, split: str, shard_tokens: int) -> tuple[list[dict], int]:
    shards: list[dict] = []
    buf: list[np.ndarray] = []
    buffered = total = 0

    def flush(final: bool = False):
        nonlocal buf, buffered
        if not buffered:
            return
        arr = np.concatenate(buf)
        while len(arr) >= shard_tokens or (final and len(arr)):
            chunk, arr = arr[:shard_tokens], arr[shard_tokens:]
            name = f"{split}_{len(shards):06d}.bin"
            chunk.tofile(out / name)
            shards.append({"file": name, "tokens": int(len(chunk)),
                           "sha256": hashlib.sha256(chunk.tobytes()).hexdigest()})
        buf, buffered = [arr], len(arr)

    for i in range(0, len(docs), ENCODE_BATCH):
        for enc in tok.encode_batch([d.text for d in docs[i:i + ENCODE_BATCH]], add_special_tokens=False):
            ids = np.asarray(enc.ids + [eot], dtype=dtype)
            buf.append(ids)
            buffered += len(ids)
            total += len(ids)
        if buffered >= shard_tokens:
            flush()
    flush(final=True)
    return shards, total
