"""`prepare` as a curation pipeline, in process: every input format, planted duplicates, bad
input, resumability. 1 in-process worker vs 2 Ray Data workers: tests/integration/test_curation.py.

The inputs are built by tests/helpers/corpora.py.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from sheepop.config import compose, to_dict
from sheepop.data import curate, ingest, pipeline
from sheepop.data.parallel import Executor
from sheepop.data.shards import load_manifest, prepare
from sheepop.data.tokenizer import load as load_tokenizer
from tests.helpers import sheepop
from tests.helpers.corpora import build_formats, cfg_for, planted_corpus, prose


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
    m = prepare(compose(["model=tiny", "data=jsonl", f"data.paths=[{tmp_path / 'in' / 'recs.log'}]",
                         "data.text_field=content", f"data.out_dir={tmp_path / 'j'}", "tokenizer.vocab_size=300"]),
                log=lambda *_: None)
    assert m["documents"] == 1 and m["languages"] == {"jsonl": 1}


def test_planted_duplicates_are_removed_and_distinct_documents_kept(tmp_path):
    ids = planted_corpus(tmp_path / "in")
    data_cfg = to_dict(cfg_for([tmp_path / "in"], tmp_path / "out"))["data"]  # the pipeline's plain form
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

    def crashing(texts, tok_json, dtype, eot):  # the injected fault: the process dies during the 4th unit
        calls.append(len(texts))
        if len(calls) == 4:
            raise Crash
        return real(texts, tok_json, dtype, eot)

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


def test_an_out_dir_that_preparing_would_wrongly_replace_is_refused_before_any_work(tmp_path):
    """Preparing replaces data.out_dir as a whole: never the inputs, never someone else's folder,
    never a file; one line each, before a document is read, and every file is still there."""
    build_formats(tmp_path / "in")
    inputs = sorted(p.name for p in (tmp_path / "in").iterdir())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("keep me too")
    for out, paths, needle in [
        (tmp_path / "in", tmp_path / "in", "would replace the input data.paths"),
        (tmp_path, f"{tmp_path / 'in'}/*.txt", "would replace the input data.paths"),
        (tmp_path / "notes", tmp_path / "in", "holds files that are not prepared data (no manifest.json)"),
        (tmp_path / "a_file", tmp_path / "in", "is a file; give a folder"),
        (tmp_path / "a_file" / "x", tmp_path / "in", "a_file is a file, not a folder"),
    ]:
        r = sheepop("prepare", "model=tiny", "data=files", f"data.paths=[{paths}]", f"data.out_dir={out}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"data.out_dir={out}" in r.stderr and needle in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == inputs
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "a_file").read_text() == "keep me too"
    assert not list(tmp_path.glob("*.tmp"))  # no work was started


def test_a_given_tokenizer_counts_by_its_content_not_its_path(tmp_path):
    """The same tokenizer.json at another path (as `trainer.init_from` gives it) is the same data:
    prepared data is reused, not rebuilt."""
    from sheepop.data.shards import fingerprint

    build_formats(tmp_path / "in")
    ref = prepare(cfg_for([tmp_path / "in"], tmp_path / "ref"), log=lambda *_: None)
    tok = (tmp_path / "ref" / "tokenizer.json").read_text()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text(tok)
    (tmp_path / "b" / "tokenizer.json").write_text(tok)
    fps = [fingerprint(cfg_for([tmp_path / "in"], tmp_path / "o", f"tokenizer.path={d / 'tokenizer.json'}"))
           for d in (tmp_path / "a", tmp_path / "b")]
    assert fps[0] == fps[1] != ref["fingerprint"]
    (tmp_path / "b" / "tokenizer.json").write_text(tok.replace('"<|pad|>"', '"<|PAD|>"'))
    assert fingerprint(cfg_for([tmp_path / "in"], tmp_path / "o", f"tokenizer.path={tmp_path / 'b' / 'tokenizer.json'}")) != fps[0]


def test_a_single_document_corpus_warns_that_validation_is_the_training_text(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "only.txt").write_text(prose(1, 300))
    lines = []
    m = prepare(cfg_for([tmp_path / "in"], tmp_path / "out"), log=lines.append)
    assert m["splits"]["train"]["shards"][0]["sha256"] == m["splits"]["val"]["shards"][0]["sha256"]
    assert any("one document only: the validation split is the training document itself" in str(line)
               for line in lines), lines
