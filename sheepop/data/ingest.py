"""Ingest: the input files, and the documents in each, whatever the format.

`list_files` turns data.paths (files, folders, globs) into a sorted file list; `read_file`
turns one file into documents. A file that cannot be read (binary, not UTF-8, corrupt PDF,
JSONL line without the text field...) is skipped with a reason, never fatal: `read_file`
returns the reasons beside the documents and the pipeline counts them.

Formats, by extension (data.source=jsonl reads every file as JSON Lines):
  text, markdown, reStructuredText   one document per file
  source code (CODE_LANGS)           one document per file, tagged with its language
  HTML                               visible text (scripts and styles dropped)
  JSONL, CSV, Parquet                one document per record, text in data.text_field
  PDF                                the text layer of all pages (pypdf)
  SQLite                             rows of data.sql, or of every table with a data.text_field column
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import sqlite3
import sysconfig
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from sheepop.errors import UserError

CODE_LANGS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".ts": "typescript",
    ".tsx": "typescript", ".jsx": "javascript", ".go": "go", ".rs": "rust", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cxx": "cpp", ".java": "java", ".kt": "kotlin",
    ".scala": "scala", ".swift": "swift", ".rb": "ruby", ".php": "php", ".cs": "csharp", ".sh": "shell",
    ".bash": "shell", ".lua": "lua", ".pl": "perl", ".r": "r", ".jl": "julia", ".hs": "haskell",
    ".sql": "sql", ".css": "css", ".f90": "fortran", ".zig": "zig", ".ex": "elixir", ".erl": "erlang",
}
TEXT_KINDS = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "rst", ".html": "html",
              ".htm": "html"}
RECORD_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pdf": "pdf",
                ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file


@dataclass
class Document:
    id: str  # path, path:line or path#row: stable across runs, decides the train/val split
    text: str
    lang: str = "text"  # text | markdown | rst | html | <code language> | jsonl | csv | parquet | pdf | sqlite


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def kind_of(path: Path, source: str) -> str:
    """How a file is read: 'jsonl' for source=jsonl, else by extension (unknown: plain text)."""
    if source == "jsonl":
        return "jsonl"
    ext = path.suffix.lower()
    return RECORD_KINDS.get(ext) or TEXT_KINDS.get(ext) or CODE_LANGS.get(ext) or "text"


def list_files(data_cfg: dict) -> list[Path]:
    """The input files, sorted, for any source. A path matching nothing is a UserError."""
    if data_cfg["source"] == "stdlib":
        root = stdlib_root()
        return sorted(p for p in root.rglob("*.py")
                      if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    exts = {e.lower() for e in data_cfg["extensions"]}
    out: list[Path] = []
    for spec in data_cfg["paths"]:
        spec = os.path.expanduser(str(spec))
        p = Path(spec)
        if p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file() and (data_cfg["source"] == "jsonl" or f.suffix.lower() in exts)]
        elif p.is_file():
            out.append(p)  # named explicitly: read whatever its extension
        else:
            hits = [Path(h) for h in glob.glob(spec, recursive=True) if Path(h).is_file()]
            if not hits:
                raise UserError(f"data.paths: '{spec}' matches no file or directory")
            out += hits
    if not out:
        raise UserError(f"data.paths={list(data_cfg['paths'])}: no input files with extensions {sorted(exts)} "
                        "(set data.extensions=[...] or name the files)")
    return sorted(set(out))


class Skip(Exception):
    """A file (or record) that is left out; str(e) says why, `reason` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def read_file(path: Path, data_cfg: dict) -> tuple[list[Document], list[tuple[str, str]]]:
    """Documents of one file and (reason, detail) of what was skipped in it."""
    kind = kind_of(path, data_cfg["source"])
    skips: list[tuple[str, str]] = []
    try:
        if kind in ("parquet", "pdf", "sqlite"):
            docs = READERS[kind](path, data_cfg, skips)
        else:
            text = _decode(path)
            if kind in READERS:
                docs = READERS[kind](path, text, data_cfg, skips)
            else:
                docs = [Document(str(path), text, kind)]
    except Skip as e:
        return [], [(e.reason, f"{path}: {e.detail}" if e.detail else str(path))]
    except OSError as e:
        return [], [("unreadable", f"{path}: {e.strerror or e}")]
    kept = [d for d in docs if d.text.strip()]
    if not kept and not skips:
        skips.append(("empty", str(path)))
    return kept, skips


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:SNIFF_BYTES]:
        raise Skip("binary", "NUL bytes in the first 8 KiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("not UTF-8", f"byte 0x{raw[e.start]:02x} at offset {e.start}") from None


def _record_text(value, field: str, where: str, skips: list, keys=None) -> str | None:
    if isinstance(value, str):
        return value
    if value is None:
        seen = f" (fields: {', '.join(map(str, list(keys)[:8]))})" if keys is not None else ""
        skips.append((f"no '{field}' field", f"{where}{seen}"))
    else:
        skips.append((f"'{field}' not text", f"{where}: {type(value).__name__}"))
    return None


def _jsonl(path: Path, text: str, data_cfg: dict, skips: list) -> list[Document]:
    field = data_cfg["text_field"]
    docs = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            skips.append(("bad JSON line", f"{path}:{i + 1}: {e.msg}"))
            continue
        if not isinstance(obj, dict):
            skips.append(("bad JSON line", f"{path}:{i + 1}: not an object"))
            continue
        value = _record_text(obj.get(field), field, f"{path}:{i + 1}", skips, obj.keys())
        if value is not None:
            docs.append(Document(f"{path}:{i + 1}", value, "jsonl"))
    return docs


def _csv(path: Path, text: str, data_cfg: dict, skips: list) -> list[Document]:
    field = data_cfg["text_field"]
    csv.field_size_limit(2**31 - 1)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or field not in reader.fieldnames:
        raise Skip(f"no '{field}' column", f"columns: {', '.join(reader.fieldnames or [])}")
    return [Document(f"{path}:{i + 2}", row[field] or "", "csv") for i, row in enumerate(reader)]


def _parquet(path: Path, data_cfg: dict, skips: list) -> list[Document]:
    import pyarrow.parquet as pq

    field = data_cfg["text_field"]
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for anything not parquet
        raise Skip("corrupt parquet", str(e).splitlines()[0]) from None
    names = pf.schema_arrow.names
    if field not in names:
        raise Skip(f"no '{field}' column", f"columns: {', '.join(names)}")
    values = pf.read(columns=[field]).column(field).to_pylist()
    docs = []
    for i, v in enumerate(values):
        v = _record_text(v, field, f"{path}#{i}", skips)
        if v is not None:
            docs.append(Document(f"{path}#{i}", v, "parquet"))
    return docs


def _pdf(path: Path, data_cfg: dict, skips: list) -> list[Document]:
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns about every odd object
    try:
        reader = PdfReader(path)
        pages = [p.extract_text() or "" for p in reader.pages]
    except Exception as e:  # pypdf raises PdfReadError, ValueError, KeyError... on broken files
        raise Skip("corrupt PDF", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise Skip("PDF without text layer", f"{len(pages)} pages")
    return [Document(str(path), text, "pdf")]


def _sqlite(path: Path, data_cfg: dict, skips: list) -> list[Document]:
    field, sql = data_cfg["text_field"], data_cfg.get("sql") or ""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            queries = [("query", sql)] if sql else [
                (t, f'SELECT "{field}" FROM "{t}" ORDER BY rowid')
                for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
                if field in [c[1] for c in con.execute(f'PRAGMA table_info("{t}")')]]
            if not queries:
                raise Skip(f"no table with a '{field}' column")
            docs = []
            for name, q in queries:
                cur = con.execute(q)
                cols = [c[0] for c in cur.description]
                col = cols.index(field) if field in cols else 0
                for i, row in enumerate(cur):
                    v = _record_text(row[col], field, f"{path}/{name}#{i}", skips)
                    if v is not None:
                        docs.append(Document(f"{path}/{name}#{i}", v, "sqlite"))
            return docs
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise Skip("bad SQLite database", str(e)) from None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: scripts, styles and the head dropped, blocks on their own lines."""

    SKIP = {"script", "style", "head", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "pre",
             "section", "article", "header", "footer", "blockquote", "hr", "title", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def html_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    p.close()
    lines = (" ".join(line.split()) for line in "".join(p.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _html(path: Path, text: str, data_cfg: dict, skips: list) -> list[Document]:
    return [Document(str(path), html_text(text), "html")]


READERS = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "pdf": _pdf, "sqlite": _sqlite, "html": _html}


def is_code(lang: str) -> bool:
    return lang in CODE_LANGS.values()
