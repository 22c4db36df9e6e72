"""Ingest → clean → deduplicate, with the funnel that says how much survived each step.

`curate_file` is the per-file work (read, normalise, filter, hash, MinHash signature); it runs
in parallel and depends on nothing but its file and the config. `Curator.add` then takes the
files' results in input order on the driver: the order-dependent steps (which copy of a
duplicate is kept, the max_bytes cut) happen there, so any number of workers gives the same
documents.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from sheepop.data import clean, dedup, ingest

EXAMPLES_PER_STAGE = 3  # removed documents kept in the manifest per stage, for the report
SNIPPET_CHARS = 240


def curate_file(item: tuple[int, str], data_cfg: dict) -> dict:
    """One file → its documents (kept ones with text, hash, signature; removed ones with a snippet)."""
    _, path = item
    c, d = data_cfg["clean"], data_cfg["dedup"]
    docs, skips = ingest.read_file(Path(path), data_cfg)
    recs = []
    for doc in docs:
        text = clean.normalize(doc.text, c["unicode_form"]) if c["normalize"] else doc.text
        rec = {"id": doc.id, "lang": doc.lang, "raw_bytes": len(doc.text.encode("utf-8")),
               "bytes": len(text.encode("utf-8"))}
        rec["removed"] = "normalize" if not text.strip() else clean.rejected_by(text, doc.lang, c)
        if rec["removed"]:
            rec["snippet"] = text[:SNIPPET_CHARS]
        else:
            rec["text"] = text
            rec["hash"] = dedup.content_hash(text) if d["exact"] else ""
            rec["sig"] = dedup.signature(text, d["shingle_size"], d["num_perm"]) if d["near"] else None
        recs.append(rec)
    try:
        size = Path(path).stat().st_size
    except OSError:
        size = 0
    return {"docs": recs, "skips": skips, "file_bytes": size}


def curator_factory(data_cfg: dict):
    """For parallel.Executor: the per-item function, built once per worker."""
    return functools.partial(curate_file, data_cfg=data_cfg)


def curate_files(files: list[Path], data_cfg: dict, ex, advance=lambda n=1: None) -> "Curator":
    """Curate `files` on executor `ex`; the driver-side steps see results in input order."""
    cur = Curator(data_cfg)
    results: dict[int, dict] = {}
    nxt = 0
    items = [(i, str(p)) for i, p in enumerate(files)]
    for i, res in ex.map(functools.partial(curator_factory, data_cfg), items, batch_size=8):
        results[i] = res
        advance()
        while nxt in results:  # feed results in input order as they arrive
            cur.add(results.pop(nxt))
            nxt += 1
    return cur


@dataclass
class Stage:
    stage: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Curator:
    """Driver side: feed file results in order with `add`, then read `kept`, `funnel()`, ..."""

    data_cfg: dict
    kept: list[dict] = field(default_factory=list)  # {id, lang, text, bytes}
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self):
        names = ["read", "normalize", *clean.FILTER_NAMES, "exact_dedup", "near_dedup"]
        self.stages = {n: Stage(n) for n in names}
        d = self.data_cfg["dedup"]
        self.seen: dict[str, str] = {}
        self.near = dedup.NearDuplicates(d["threshold"], d["num_perm"]) if d["near"] else None
        self.limit = self.data_cfg.get("max_bytes") or 0
        self.read_bytes = 0

    def full(self) -> bool:
        return bool(self.limit) and self.read_bytes >= self.limit

    def add(self, result: dict) -> None:
        s = self.stages
        s["read"].docs_in += 1
        s["read"].bytes_in += result["file_bytes"]
        for reason, detail in result["skips"]:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            ex = self.skipped_examples.setdefault(reason, [])
            if len(ex) < EXAMPLES_PER_STAGE:
                ex.append(detail)
        for rec in result["docs"]:
            if self.full():  # data.max_bytes: stop after the document that crosses it
                return
            self.read_bytes += rec["raw_bytes"]
            self._through(rec)

    def _through(self, rec: dict) -> None:
        s = self.stages
        s["read"].docs_out += 1
        s["read"].bytes_out += rec["raw_bytes"]
        st = s["normalize"]
        st.docs_in += 1
        st.bytes_in += rec["raw_bytes"]
        if rec["removed"] == "normalize":
            return self._remove("normalize", rec)
        st.docs_out += 1
        st.bytes_out += rec["bytes"]
        for name in clean.FILTER_NAMES:
            if not self._enter(name, rec):
                return
        if not self._enter("exact_dedup", rec, lambda: self._exact(rec)):
            return
        if not self._enter("near_dedup", rec, lambda: self._near(rec)):
            return
        self.kept.append({"id": rec["id"], "lang": rec["lang"], "text": rec["text"], "bytes": rec["bytes"]})

    def _enter(self, name: str, rec: dict, dup_of=None) -> bool:
        st = self.stages[name]
        st.docs_in += 1
        st.bytes_in += rec["bytes"]
        if rec["removed"] == name:
            self._remove(name, rec)
            return False
        if dup_of is not None:
            other = dup_of()
            if other:
                self._remove(name, rec, duplicate_of=other)
                return False
        st.docs_out += 1
        st.bytes_out += rec["bytes"]
        return True

    def _exact(self, rec: dict) -> str:
        if not rec["hash"]:
            return ""
        other = self.seen.get(rec["hash"], "")
        if not other:
            self.seen[rec["hash"]] = rec["id"]
        return other

    def _near(self, rec: dict) -> str:
        return self.near.check(rec["id"], rec["sig"]) if self.near is not None else ""

    def _remove(self, name: str, rec: dict, **extra) -> None:
        ex = self.examples.setdefault(name, [])
        if len(ex) < EXAMPLES_PER_STAGE:
            snippet = rec.get("snippet", rec.get("text", ""))[:SNIPPET_CHARS]
            ex.append({"id": rec["id"], "snippet": snippet, **extra})

    def funnel(self) -> list[dict]:
        return [vars(st).copy() for st in self.stages.values()]

    def languages(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.kept:
            out[d["lang"]] = out.get(d["lang"], 0) + 1
        return dict(sorted(out.items()))
