"""Integration tests of `prepare` as a curation pipeline: every input format, planted duplicates,
bad input, resumability, and 1 in-process worker vs 2 Ray Data workers (real Ray on 127.0.0.1).

Inputs are built here: prose from a seeded random vocabulary (distinct documents share almost
no 5-word shingles), code files, JSONL/CSV/Parquet/SQLite records, a PDF written byte by byte,
and junk (binary, Latin-1, corrupt PDF, JSONL without the text field, an empty file).
"""
from __future__ import annotations

import csv
import json
import pickle
import random
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import sheepop
from sheepop.config import compose, to_dict
from sheepop.data import curate, ingest, pipeline
from sheepop.data.parallel import Executor
from sheepop.data.shards import load_manifest, prepare
from sheepop.data.tokenizer import load as load_tokenizer

_rng = random.Random(0)
VOCAB = sorted({"".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(3, 9)))
                for _ in range(3000)})


def prose(seed: int, n_words: int = 220) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(VOCAB))
        if len(line) >= rng.randint(8, 14):
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(lines + ([" ".join(line)] if line else []))


def near_copy(text: str, seed: int) -> str:
    """One of the edits a scraped copy shows: a few words changed, a line added, a sentence dropped, case/spacing."""
    rng = random.Random(seed)
    lines = text.split("\n")
    kind = seed % 4
    if kind == 0:  # ~2% of words replaced
        ws = text.split(" ")
        for i in rng.sample(range(len(ws)), max(1, len(ws) // 50)):
            ws[i] = rng.choice(VOCAB)
        return " ".join(ws)
    if kind == 1:
        return "Posted on the mirror site, copied verbatim.\n" + text + "\nShare this page."
    if kind == 2:
        del lines[rng.randrange(len(lines))]
        return "\n".join(lines)
    return text.upper().replace(". ", ".  ").replace("\n", "\n\n")


def minimal_pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF whose text layer holds `lines` (Helvetica, one Tj per line)."""
    esc = [ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for ln in lines]
    stream = "BT /F1 11 Tf 14 TL 50 780 Td " + " ".join(f"({ln}) Tj T*" for ln in esc) + " ET"
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
            "/Contents 5 0 R >>", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"]
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def build_formats(root: Path) -> dict[str, str]:
    """One small input per format plus junk; returns a marker word per format that must reach the shards."""
    root.mkdir(parents=True, exist_ok=True)
    m = {k: f"marker{k}zq" for k in ("txt", "md", "rst", "html", "py", "js", "jsonl", "csv", "parquet", "pdf", "sqlite")}
    (root / "a.txt").write_text(prose(1) + f"\n{m['txt']} ends here.")
    (root / "b.md").write_text(f"# Title\n\n{prose(2)}\n\n* item {m['md']}\n")
    (root / "c.rst").write_text(f"Title\n=====\n\n{prose(3)} {m['rst']}\n")
    (root / "d.html").write_text(f"<html><head><script>var hidden = 'scriptzq';</script></head><body><p>{prose(4)}</p>"
                                 f"<p>{m['html']}</p></body></html>")
    (root / "e.py").write_text(f"def {m['py']}(x):\n    '''{prose(5, 40)}'''\n    return x + 1\n\n\nclass A:\n    pass\n")
    (root / "f.js").write_text(f"function {m['js']}(a, b) {{\n  // {prose(6, 30)}\n  return a + b;\n}}\n")
    recs = [{"text": prose(7) + f" {m['jsonl']}", "id": 1}, {"text": prose(8), "id": 2},
            {"body": "no text field here", "id": 3}]
    (root / "g.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    with open(root / "h.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerow([1, prose(9) + f"\n{m['csv']}, with a comma and a \"quote\""])
        w.writerow([2, prose(10)])
    pq.write_table(pa.table({"id": [1, 2], "text": [prose(11) + f" {m['parquet']}", prose(12)]}), root / "i.parquet")
    (root / "j.pdf").write_bytes(minimal_pdf([prose(13, 12), f"The {m['pdf']} line.", prose(14, 12)]))
    con = sqlite3.connect(root / "k.sqlite")
    con.execute("CREATE TABLE posts (id INTEGER, text TEXT)")
    con.executemany("INSERT INTO posts VALUES (?, ?)", [(1, prose(15) + f" {m['sqlite']}"), (2, prose(16)), (3, None)])
    con.execute("CREATE TABLE other (x INTEGER)")
    con.commit()
    con.close()
    # junk: every one must be skipped with its reason, none may stop the run
    (root / "z_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "z_latin1.txt").write_bytes(("Caf\xe9 " + prose(17)).encode("latin-1"))
    (root / "z_corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pa")
    (root / "z_empty.md").write_text("   \n\n")
    return m


def cfg_for(paths, out: Path, *extra: str) -> dict:
    return to_dict(compose(["model=tiny", "data=files", f"data.paths=[{','.join(map(str, paths))}]",
                            f"data.out_dir={out}", "data.val_fraction=0.1", "tokenizer.vocab_size=300", *extra]))


def decoded(out: Path) -> str:
    m = load_manifest(out)
    tok = load_tokenizer(out / "tokenizer.json")
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=m["dtype"])
                          for sp in ("train", "val") for s in m["splits"][sp]["shards"]])
    return tok.decode(ids.tolist(), skip_special_tokens=False)


def test_every_format_is_ingested_and_junk_is_skipped_with_reasons(tmp_path):
    markers = build_formats(tmp_path / "in")
    cfg = cfg_for([tmp_path / "in"], tmp_path / "out")
    m = prepare(cfg, log=lambda *_: None)
    text = decoded(tmp_path / "out")
    for fmt, marker in markers.items():
        assert marker in text, f"{fmt} document missing from the shards"
    assert "scriptzq" not in text  # HTML scripts are not text
    assert m["skipped"] == {"binary": 1, "not UTF-8": 1, "corrupt PDF": 1, "empty": 1, "no 'text' field": 2,
                            "bad JSON line": 1}
    assert any("z_latin1.txt: byte 0xe9" in e for e in m["skipped_examples"]["not UTF-8"])
    assert any("fields: body, id" in e for e in m["skipped_examples"]["no 'text' field"])
    assert m["languages"] == {"csv": 2, "html": 1, "javascript": 1, "jsonl": 2, "markdown": 1, "parquet": 2, "pdf": 1,
                              "python": 1, "rst": 1, "sqlite": 2, "text": 1}
    assert m["documents"] == 15 == m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"]
    stages = [s["stage"] for s in m["funnel"]]
    assert stages[:2] == ["read", "normalize"] and stages[-3:] == ["exact_dedup", "near_dedup", "tokenize"]
    assert m["funnel"][0]["docs_in"] == 15  # files
    for a, b in zip(m["funnel"][1:], m["funnel"][2:]):
        assert b["docs_in"] == a["docs_out"]  # the funnel chains
    for sp in ("train", "val"):
        for s in m["splits"][sp]["shards"]:
            assert __import__("hashlib").sha256((tmp_path / "out" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "tokenizer.json",
                                                                   "train_000000.bin", "val_000000.bin"]


def test_sqlite_query_and_jsonl_source(tmp_path):
    build_formats(tmp_path / "in")
    m = prepare(cfg_for([tmp_path / "in" / "k.sqlite"], tmp_path / "q",
                        "data.sql='SELECT text FROM posts WHERE id = 2'", "data.val_fraction=0.5"), log=lambda *_: None)
    assert m["documents"] == 1 and m["languages"] == {"sqlite": 1}
    (tmp_path / "in" / "recs.log").write_text(json.dumps({"content": prose(30)}) + "\n")
    m = prepare(to_dict(compose(["model=tiny", "data=jsonl", f"data.paths=[{tmp_path / 'in' / 'recs.log'}]",
                                 "data.text_field=content", f"data.out_dir={tmp_path / 'j'}",
                                 "tokenizer.vocab_size=300"])), log=lambda *_: None)
    assert m["documents"] == 1 and m["languages"] == {"jsonl": 1}


def planted_corpus(root: Path, n_distinct=300, n_near=60, n_exact=30) -> dict[str, list]:
    """Distinct prose files (a_*), near copies (n_*) and exact copies (x_*: same text, CRLF or trailing spaces)."""
    root.mkdir(parents=True)
    ids = {"distinct": [], "near": [], "exact": []}
    texts = [prose(1000 + i, random.Random(i).randint(120, 400)) for i in range(n_distinct)]
    for i, t in enumerate(texts):
        (root / f"a_{i:04d}.txt").write_text(t)
        ids["distinct"].append(str(root / f"a_{i:04d}.txt"))
    rng = random.Random(7)
    for j, i in enumerate(rng.sample(range(n_distinct), n_near)):
        (root / f"n_{j:04d}.txt").write_text(near_copy(texts[i], j))
        ids["near"].append(str(root / f"n_{j:04d}.txt"))
    for j, i in enumerate(rng.sample(range(n_distinct), n_exact)):
        t = texts[i].replace("\n", "  \r\n") if j % 2 else texts[i]  # differs only in what cleaning normalises
        (root / f"x_{j:04d}.txt").write_bytes(t.encode())
        ids["exact"].append(str(root / f"x_{j:04d}.txt"))
    return ids


def test_planted_duplicates_are_removed_and_distinct_documents_kept(tmp_path):
    ids = planted_corpus(tmp_path / "in")
    data_cfg = cfg_for([tmp_path / "in"], tmp_path / "out")["data"]
    cur = curate.curate_files(ingest.list_files(data_cfg), data_cfg, Executor(1))
    kept = {d["id"] for d in cur.kept}
    assert not kept & set(ids["exact"])  # every exact copy removed
    near_removed = len(set(ids["near"]) - kept) / len(ids["near"])
    distinct_lost = len(set(ids["distinct"]) - kept) / len(ids["distinct"])
    assert near_removed >= 0.9, near_removed
    assert distinct_lost < 0.02, distinct_lost
    f = {s["stage"]: s for s in cur.funnel()}
    assert f["exact_dedup"]["docs_in"] - f["exact_dedup"]["docs_out"] == len(ids["exact"])
    assert all(e["duplicate_of"] in ids["distinct"] for e in cur.examples["near_dedup"])


def test_bad_input_gives_one_clear_line(tmp_path):
    build_formats(tmp_path / "in")
    r = sheepop("prepare", "model=tiny", "data=files", f"data.paths=[{tmp_path / 'in'},{tmp_path / 'nope'}]",
                f"data.out_dir={tmp_path / 'o1'}")
    assert r.returncode == 2 and "nope' matches no file or directory" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o1").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_bytes("Déjà vu, naïve café".encode("latin-1"))
    (tmp_path / "junk" / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    r = sheepop("prepare", "model=tiny", "data=files", f"data.paths=[{tmp_path / 'junk'}]",
                f"data.out_dir={tmp_path / 'o2'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no documents left" in r.stderr and "1 not UTF-8" in r.stderr and "1 no 'text' field" in r.stderr
    r = sheepop("prepare", "model=tiny", "data=files", f"data.paths=[{tmp_path / 'junk'}]", "data.dedup.threshold=2")
    assert r.returncode == 2 and "data.dedup.threshold=2" in r.stderr
    # mixed good and bad: the run completes and reports what it skipped
    r = sheepop("prepare", "model=tiny", "data=files", f"data.paths=[{tmp_path / 'in'}]", "tokenizer.vocab_size=300",
                f"data.out_dir={tmp_path / 'o3'}")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 × corrupt PDF" in r.stdout and "skipped 1 × not UTF-8" in r.stdout
    assert load_manifest(tmp_path / "o3")["skipped"]["corrupt PDF"] == 1


def test_a_crash_resumes_from_the_finished_units_and_gives_the_same_bytes(tmp_path, monkeypatch):
    planted_corpus(tmp_path / "in", n_distinct=120, n_near=5, n_exact=5)
    monkeypatch.setattr(pipeline, "UNIT_BYTES", 20_000)  # several units from a small corpus
    ref = prepare(cfg_for([tmp_path / "in"], tmp_path / "ref"), log=lambda *_: None)

    calls = []
    real = pipeline.tokenize_texts

    class Crash(Exception):
        pass

    def crashing(texts, tok_json, dtype):  # the injected fault: the process dies during the 4th unit
        calls.append(len(texts))
        if len(calls) == 4:
            raise Crash
        return real(texts, tok_json, dtype)

    monkeypatch.setattr(pipeline, "tokenize_texts", crashing)
    cfg = cfg_for([tmp_path / "in"], tmp_path / "out")
    with pytest.raises(Crash):
        prepare(cfg, log=lambda *_: None)
    work = tmp_path / "out.tmp"
    assert len(list((work / "units").glob("*.bin"))) == 3 and not (tmp_path / "out").exists()
    curated = pickle.loads((work / "curated.pkl").read_bytes())
    n_units = sum(len(u) for u in pipeline._units(curated["split"]).values())
    assert n_units > 4
    calls.clear()
    monkeypatch.setattr(pipeline, "tokenize_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    logs = []
    m = prepare(cfg, log=logs.append)
    assert any("resuming" in line for line in logs)
    assert len(calls) == n_units - 3  # only the missing units were tokenized
    assert [s["sha256"] for s in m["splits"]["train"]["shards"]] == [s["sha256"] for s in ref["splits"]["train"]["shards"]]
    assert m["funnel"] == ref["funnel"] and m["tokenizer"] == ref["tokenizer"]
    assert not work.exists()
    logs.clear()
    assert prepare(cfg, log=logs.append)["fingerprint"] == m["fingerprint"] and not logs  # done: nothing rerun


@pytest.mark.slow
def test_two_ray_data_workers_write_the_same_bytes_as_one(tmp_path, monkeypatch):
    planted_corpus(tmp_path / "in", n_distinct=150, n_near=10, n_exact=10)
    build_formats(tmp_path / "in" / "formats")
    monkeypatch.setattr(pipeline, "UNIT_BYTES", 30_000)
    one = prepare(cfg_for([tmp_path / "in"], tmp_path / "w1", "data.shard_tokens=20000"), log=lambda *_: None)
    two = prepare(cfg_for([tmp_path / "in"], tmp_path / "w2", "data.shard_tokens=20000", "data.num_workers=2",
                          "cluster=process"), log=lambda *_: None)
    assert two["num_workers"] == 2 and len(one["splits"]["train"]["shards"]) > 2
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    for key in ("funnel", "splits", "tokenizer", "skipped", "removed_examples", "languages"):
        assert one[key] == two[key], key
    import ray

    assert not ray.is_initialized()  # prepare stopped the Ray it started
