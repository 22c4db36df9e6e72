"""Where documents come from: the embedded stdlib corpus, the user's files, JSONL.

Each source yields `Document(id, text)` in a fixed order (sorted paths), so the same inputs
always give the same shards. Files that are not UTF-8 text are skipped and counted, not fatal.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sheepop.errors import UserError


@dataclass
class Document:
    id: str  # path (or path:line for JSONL): stable across runs, used for the train/val split
    text: str


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(data_cfg: dict) -> list[Path]:
    """The input files, sorted, for any source."""
    exts = tuple(data_cfg["extensions"])
    if data_cfg["source"] == "stdlib":
        root = stdlib_root()
        return sorted(p for p in root.rglob("*.py")
                      if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    out: list[Path] = []
    for spec in data_cfg["paths"]:
        spec = os.path.expanduser(str(spec))
        p = Path(spec)
        if p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file() and (data_cfg["source"] == "jsonl" or f.suffix in exts)]
        elif p.is_file():
            out.append(p)
        else:
            hits = [Path(h) for h in glob.glob(spec, recursive=True) if Path(h).is_file()]
            if not hits:
                raise UserError(f"data.paths: '{spec}' matches no file or directory")
            out += hits
    if not out:
        raise UserError(f"data.paths={list(data_cfg['paths'])}: no input files (extensions {list(exts)})")
    return sorted(set(out))


def iter_documents(data_cfg: dict, stats: ReadStats | None = None) -> Iterator[Document]:
    stats = stats if stats is not None else ReadStats()
    limit = data_cfg.get("max_bytes") or 0
    for path in list_files(data_cfg):
        stats.files += 1
        try:
            raw = path.read_bytes()
        except OSError:
            stats.skip("unreadable")
            continue
        if b"\x00" in raw[:8192]:
            stats.skip("binary")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("not utf-8")
            continue
        if data_cfg["source"] == "jsonl":
            docs = _jsonl_docs(path, text, data_cfg["text_field"], stats)
        else:
            docs = [Document(str(path), text)] if text.strip() else []
            if not docs:
                stats.skip("empty")
        for doc in docs:
            stats.documents += 1
            stats.bytes += len(doc.text.encode("utf-8"))
            yield doc
            if limit and stats.bytes >= limit:
                return


def _jsonl_docs(path: Path, text: str, field_name: str, stats: ReadStats) -> list[Document]:
    docs = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            stats.skip("bad json line")
            continue
        value = obj.get(field_name) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            stats.skip(f"no '{field_name}' field")
            continue
        if value.strip():
            docs.append(Document(f"{path}:{i + 1}", value))
    return docs
