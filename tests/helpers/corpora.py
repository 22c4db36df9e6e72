"""Inputs for the curation tests, built on the fly: prose from a seeded random vocabulary
(distinct documents share almost no 5-word shingles), near and exact copies of it, code files,
JSONL/CSV/Parquet/SQLite records, a PDF written byte by byte, and junk (binary, Latin-1, corrupt
PDF, JSONL without the text field, an empty file)."""
from __future__ import annotations

import csv
import json
import random
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sheepop.config import compose

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


def cfg_for(paths, out: Path, *extra: str):
    """The typed Config of a `data=files` prepare of `paths` into `out`."""
    return compose(["model=tiny", "data=files", f"data.paths=[{','.join(map(str, paths))}]",
                    f"data.out_dir={out}", "data.val_fraction=0.1", "tokenizer.vocab_size=300", *extra])


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


def mixture_sources(root: Path, docs: int = 60) -> tuple[Path, Path]:
    """Two corpora prepared separately with one tokenizer, for data.mixture: `prose` (lower-case
    prose) and `shout` (upper-case prose of other seeds), the second prepared with the first's
    tokenizer.json. Reused when already prepared (prepare() checks its inputs)."""
    from sheepop.data.shards import prepare

    dirs = []
    for name, case, first in (("prose", str.lower, 0), ("shout", str.upper, 10_000)):
        src = root / f"{name}-in"
        src.mkdir(parents=True, exist_ok=True)
        for i in range(docs):  # unchanged files keep their mtime: the prepared data is reused
            f, text = src / f"{i}.txt", case(prose(first + i, 300))
            if not f.is_file() or f.read_text() != text:
                f.write_text(text)
        tok = [f"tokenizer.path={dirs[0] / 'tokenizer.json'}"] if dirs else []
        out = root / name
        prepare(compose(["model=tiny", "data=files", f"data.paths=[{src}]", f"data.out_dir={out}",
                         "data.val_fraction=0.2", *tok]), log=lambda *_: None, progress=False)
        dirs.append(out)
    return dirs[0], dirs[1]
