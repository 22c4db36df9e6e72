"""The prepare pipeline: curate → tokenizer → tokenize (in units) → shards + manifest.

Everything happens inside a work folder (data.out_dir + '.tmp') that survives a crash:
  state.json       the fingerprint the work belongs to (other inputs: the folder is wiped)
  curated.pkl      the documents that survived curation, with the funnel (stage 1-3 done)
  tokenizer.json   the tokenizer (stage 4 done)
  units/*.bin      token ids of consecutive groups of ~UNIT_BYTES of documents (stage 5),
                   each written atomically, so a rerun tokenizes only the missing ones
Shards are then cut from the concatenated units, which makes them independent of the
unit size and of the number of workers.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sheepop.data import curate, ingest, tokenizer as toklib
from sheepop.data.parallel import Executor
from sheepop.errors import UserError

MANIFEST_VERSION = 2
UNIT_BYTES = 4_000_000  # text per tokenization unit: the resumable and parallel grain
ENCODE_BATCH = 256  # documents per encode_batch call (the Rust side parallelises within it)


def is_val(doc_id: str, fraction: float) -> bool:
    """Split by document, by a hash of its id: stable when other documents come and go."""
    return int(hashlib.md5(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


class Progress:
    """One rich progress bar per stage (drawn only when enabled: a terminal by default)."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn

            self.bar = RichProgress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), transient=False)

    @contextmanager
    def stage(self, name: str, total: int):
        task = self.bar.add_task(name, total=total) if self.bar else None
        yield (lambda n=1: self.bar.advance(task, n)) if self.bar else (lambda n=1: None)
        if self.bar:
            self.bar.update(task, completed=total)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def build(cfg: dict, work: Path, fp: str, log, progress: bool | None) -> dict:
    data_cfg = cfg["data"]
    t0 = time.time()
    seconds: dict[str, float] = {}
    show = progress if progress is not None else sys.stderr.isatty()
    with Executor(data_cfg["num_workers"], cfg.get("cluster")) as ex, Progress(show) as ui:
        t = time.time()
        cur = _curated(cfg, work, ex, ui, log)
        seconds["curate"] = round(time.time() - t, 3)
        t = time.time()
        tok = _tokenizer(cfg, work, cur["split"]["train"], log)
        seconds["tokenizer"] = round(time.time() - t, 3)
        t = time.time()
        vocab = tok.get_vocab_size()
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        units = _units(cur["split"])
        _tokenize_units(units, work, tok, toklib.eot_id(tok, toklib.eot_token(cfg)), dtype, ex, ui)
        seconds["tokenize"] = round(time.time() - t, 3)
    t = time.time()
    splits = {}
    for name, docs in cur["split"].items():
        shards = write_shards([work / "units" / f"{k}.bin" for k, _ in units[name]], work, name, dtype,
                              data_cfg["shard_tokens"])
        splits[name] = {"docs": len(docs), "bytes": sum(d["bytes"] for d in docs),
                        "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    seconds["shards"] = round(time.time() - t, 3)
    total_tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    kept_bytes = cur["funnel"][-1]["bytes_out"]
    n_docs = cur["documents"]  # a 1-document corpus is both train and val, counted once
    funnel = cur["funnel"] + [{"stage": "tokenize", "docs_in": n_docs, "docs_out": n_docs, "bytes_in": kept_bytes,
                               "bytes_out": total_tokens * np.dtype(dtype).itemsize, "tokens": total_tokens}]
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "source": data_cfg["source"],
        "dtype": np.dtype(dtype).name,
        "files": cur["files"],
        "documents": n_docs,
        "bytes": kept_bytes,
        "tokens": total_tokens,
        "tokenizer": {"file": "tokenizer.json", "sha256_16": toklib.file_hash(work / "tokenizer.json"),
                      "vocab_size": vocab, "eot_token": toklib.eot_token(cfg),
                      "eot_id": toklib.eot_id(tok, toklib.eot_token(cfg))},
        "splits": splits,
        "funnel": funnel,
        "skipped": cur["skipped"],
        "skipped_examples": cur["skipped_examples"],
        "removed_examples": cur["removed_examples"],
        "languages": cur["languages"],
        "num_workers": data_cfg["num_workers"],
        "stage_seconds": seconds,
        "seconds": round(time.time() - t0, 2),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"prepared {total_tokens:,} tokens in {manifest['seconds']}s → {data_cfg['out_dir']}")
    return manifest


def _curated(cfg: dict, work: Path, ex: Executor, ui: Progress, log) -> dict:
    """Stages 1-3 (ingest, clean, dedup), or their saved result when resuming."""
    cache = work / "curated.pkl"
    if cache.is_file():
        log("resuming: curated documents already saved")
        return pickle.loads(cache.read_bytes())
    data_cfg = cfg["data"]
    files = ingest.list_files(data_cfg)
    if data_cfg.get("max_bytes"):  # read only about as many files as the budget needs
        budget, cut = data_cfg["max_bytes"], 0
        for cut, p in enumerate(files, 1):
            budget -= p.stat().st_size
            if budget <= 0:
                break
        files = files[:cut]
    with ui.stage("curate", len(files)) as advance:
        cur = curate.curate_files(files, data_cfg, ex, advance)
    _log_skips(cur, log)
    if not cur.kept:
        why = ", ".join(f"{s['stage']} removed {s['docs_in'] - s['docs_out']}" for s in cur.funnel()[1:]
                        if s["docs_in"] != s["docs_out"])
        raise UserError(f"data (source={data_cfg['source']}): no documents left to train on "
                        f"({len(files)} files; skipped: {_skip_summary(cur) or 'none'}; {why or 'nothing read'})")
    split = {"train": [], "val": []}
    for d in cur.kept:
        split["val" if is_val(d["id"], data_cfg["val_fraction"]) else "train"].append(d)
    if not split["val"] or not split["train"]:  # tiny corpora: hold out the last document
        split["train"], split["val"] = cur.kept[:-1] or cur.kept, cur.kept[-1:]
    if len(cur.kept) == 1:
        log("warning: one document only: the validation split is the training document itself, so val_loss "
            "measures memorization, not generalization; add documents for a held-out split")
    funnel = cur.funnel()
    lost = {s["stage"]: s["docs_in"] - s["docs_out"] for s in funnel[1:] if s["docs_in"] != s["docs_out"]}
    log(f"read {funnel[0]['docs_out']} documents from {len(files)} files, {funnel[0]['bytes_out'] / 1e6:.1f} MB; "
        f"kept {len(cur.kept)}, {sum(d['bytes'] for d in cur.kept) / 1e6:.1f} MB "
        f"(removed: {', '.join(f'{k} {v}' for k, v in lost.items()) or 'none'}; {len(split['val'])} for validation)")
    out = {"split": split, "funnel": funnel, "files": len(files), "documents": len(cur.kept), "skipped": cur.skipped,
           "skipped_examples": cur.skipped_examples, "removed_examples": cur.examples,
           "languages": cur.languages()}
    tmp = cache.with_suffix(".part")
    tmp.write_bytes(pickle.dumps(out, protocol=5))
    tmp.rename(cache)
    return out


def _skip_summary(cur) -> str:
    """'3 not UTF-8, 2 no 'text' field (e.g. a.jsonl:1 (fields: body, id))' for the error line."""
    if not cur.skipped:
        return ""
    top = max(cur.skipped, key=cur.skipped.get)
    return (", ".join(f"{n} {r}" for r, n in sorted(cur.skipped.items()))
            + f" (e.g. {top}: {cur.skipped_examples[top][0]})")


def _log_skips(cur, log) -> None:
    for reason, n in sorted(cur.skipped.items()):
        ex = cur.skipped_examples[reason]
        log(f"skipped {n} × {reason}: {'; '.join(ex)}{' …' if n > len(ex) else ''}")


def _tokenizer(cfg: dict, work: Path, train_docs: list[dict], log):
    """Stage 4: reuse tokenizer.path, or train a byte-level BPE on the first train_bytes of training text."""
    tok_cfg, path = cfg["tokenizer"], work / "tokenizer.json"
    if not path.is_file():
        if tok_cfg.get("path"):
            shutil.copyfile(tok_cfg["path"], path)
        else:
            t = time.time()
            tok = toklib.train_bpe(_sample(train_docs, tok_cfg["train_bytes"]), tok_cfg["vocab_size"],
                                   tok_cfg["special_tokens"])
            tok.save(str(path.with_suffix(".part")))
            path.with_suffix(".part").rename(path)
            log(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens ({time.time() - t:.1f}s)")
    tok = toklib.load(path)
    toklib.eot_id(tok, toklib.eot_token(cfg))
    return tok


def _sample(docs: list[dict], max_bytes: int):
    seen = 0
    for d in docs:
        yield d["text"]
        seen += len(d["text"])
        if max_bytes and seen >= max_bytes:
            return


def _units(split: dict) -> dict[str, list[tuple[str, list[str]]]]:
    """Consecutive groups of documents of about UNIT_BYTES each, per split: [(key, texts)]."""
    out: dict[str, list] = {}
    for name, docs in split.items():
        units, cur, size = [], [], 0
        for d in docs:
            cur.append(d["text"])
            size += d["bytes"]
            if size >= UNIT_BYTES:
                units.append(cur)
                cur, size = [], 0
        if cur:
            units.append(cur)
        out[name] = [(f"{name}_{i:06d}", texts) for i, texts in enumerate(units)]
    return out


def tokenize_texts(texts: list[str], tok_json: str, dtype: str, eot: int) -> bytes:
    """Token ids of the texts, the document separator `eot` after each, as raw bytes of `dtype`."""
    tok = _load_tokenizer(tok_json)
    parts = []
    for i in range(0, len(texts), ENCODE_BATCH):
        for enc in tok.encode_batch(texts[i:i + ENCODE_BATCH], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eot], dtype=dtype))
    return np.concatenate(parts).tobytes() if parts else b""


@functools.lru_cache(maxsize=2)
def _load_tokenizer(tok_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_json)


def tokenizer_factory(tok_json: str, dtype: str, eot: int):
    return functools.partial(tokenize_texts, tok_json=tok_json, dtype=dtype, eot=eot)


def _tokenize_units(units: dict, work: Path, tok, eot: int, dtype, ex: Executor, ui: Progress) -> None:
    """Stage 5: tokenize every unit whose file is missing; each file appears complete or not at all."""
    udir = work / "units"
    udir.mkdir(exist_ok=True)
    todo = [(k, texts) for parts in units.values() for k, texts in parts if not (udir / f"{k}.bin").is_file()]
    total = sum(len(p) for p in units.values())
    factory = functools.partial(tokenizer_factory, tok.to_str(), np.dtype(dtype).name, eot)
    with ui.stage("tokenize", total) as advance:
        advance(total - len(todo))
        for i, data in ex.map(factory, [texts for _, texts in todo]):
            key = todo[i][0]
            part = udir / f"{key}.part"
            part.write_bytes(data)
            os.replace(part, udir / f"{key}.bin")
            advance()


def write_shards(unit_files: list[Path], out: Path, split: str, dtype, shard_tokens: int) -> list[dict]:
    """Concatenate the units and cut the stream into shards of shard_tokens tokens."""
    shards: list[dict] = []
    buf = np.zeros(0, dtype=dtype)

    def emit(chunk: np.ndarray) -> None:
        name = f"{split}_{len(shards):06d}.bin"
        chunk.tofile(out / name)
        shards.append({"file": name, "tokens": int(len(chunk)), "sha256": hashlib.sha256(chunk.tobytes()).hexdigest()})

    for f in unit_files:
        buf = np.concatenate([buf, np.fromfile(f, dtype=dtype)])
        while len(buf) >= shard_tokens:
            emit(buf[:shard_tokens])
            buf = buf[shard_tokens:]
    if len(buf):
        emit(buf)
    return shards
