"""`sheepop report` on a real finished run: self-contained HTML with embedded PNG plots, the data
funnel as in the manifest (whatever stages it lists), tokenizer examples, events, samples.
Bad input: tests/unit/test_report.py."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from tests.helpers import sheepop, tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run with its report written by the CLI (the other reports are written in-process:
    the same code without a new interpreter importing torch and matplotlib each time)."""
    run = tmp_path_factory.mktemp("report") / "run"
    r = sheepop("train", *tiny_overrides(run, "trainer.progress=false"),
                env={"SHEEPOP_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    assert r.returncode == 0, r.stderr[-3000:]
    r = sheepop("report", str(run))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {run}/report.html")
    return run


def write_report(run_dir: Path, **kw) -> Path:
    from sheepop.monitor import report

    html_path, _ = report.write(run_dir, **kw)
    return html_path


class Page(HTMLParser):
    """Tables (as lists of cell texts per row), img sources, and every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith(("#", "data:")):
                self.urls.append(a[k])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def table_with(page: Page, header: str) -> list[list[str]]:
    return next(t for t in page.tables if t and t[0] and t[0][0] == header)


def test_report_html_is_self_contained_with_embedded_plots(run):
    from PIL import Image

    page = parse(run / "report.html")
    assert page.urls == []  # nothing fetched from elsewhere: no links, scripts or remote images
    assert len(page.imgs) == 3 and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    for src in page.imgs:  # real PNGs of a readable size
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG" and img.width >= 600 and img.height >= 250
    md = (run / "report.md").read_text()
    for name in re.findall(r"\]\(report_files/([^)]+)\)", md):
        assert (run / "report_files" / name).is_file()
    assert {"loss.png", "lr.png", "throughput.png"} <= set(re.findall(r"report_files/([\w.]+)", md))


def test_report_funnel_matches_the_manifest_whatever_its_stages(run, tmp_path):
    """The run's own manifest, then a copy with extra clean/dedup stages (as a later prepare may
    write): every stage is rendered with its numbers, in order."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    manifest = json.loads((Path(cfg["data"]["out_dir"]) / "manifest.json").read_text())
    extra = [{"stage": "clean", "docs_in": 1000, "docs_out": 900, "bytes_in": 3_000_000, "bytes_out": 2_700_000},
             {"stage": "dedup", "docs_in": 900, "docs_out": 850, "bytes_in": 2_700_000, "bytes_out": 2_500_123}]
    data2 = tmp_path / "data2"
    data2.mkdir()
    (data2 / "manifest.json").write_text(json.dumps({**manifest, "funnel": manifest["funnel"] + extra}))
    run2 = tmp_path / "run2"
    shutil.copytree(run, run2, ignore=shutil.ignore_patterns("checkpoints", "report*"))
    (run2 / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "out_dir": str(data2)}}))

    for run_dir, funnel in ((run, manifest["funnel"]), (run2, manifest["funnel"] + extra)):
        rows = table_with(parse(write_report(run_dir)), "stage")
        stages = [row for row in rows[1:] if not row[0].startswith("→")]
        assert [row[0] for row in stages] == [st["stage"] for st in funnel]
        for row, st in zip(stages, funnel):
            n = [int(c.replace(",", "")) for c in (row[1], row[2], row[7], row[8])]
            assert n == [st["docs_in"], st["docs_out"], st["bytes_in"], st["bytes_out"]], (row, st)
        splits = {row[0]: row for row in rows[1:] if row[0].startswith("→")}
        assert int(splits["→ train split"][2].replace(",", "")) == manifest["splits"]["train"]["docs"]
        text = (run_dir / "report.md").read_text()
        assert f"{manifest['tokens']:,}" in text and f"{manifest['splits']['train']['tokens']:,}" in text


def test_report_explains_tokenizer_model_events_and_samples(run):
    from tokenizers import Tokenizer

    page = parse(run / "report.html")
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    rows = {row[0]: row for row in table_with(page, "text")[1:]}
    for word in ("cat", "caterpillar"):
        ids = tok.encode(word, add_special_tokens=False).ids
        assert rows[repr(word)][1] == str(len(ids))
        assert rows[repr(word)][2].replace("·", " ") == word  # the pieces spell the word
    assert int(rows["'caterpillar'"][1]) > int(rows["'cat'"][1])

    model = {row[0]: row[1] for t in page.tables for row in t if len(row) == 2}  # the key/value tables
    from sheepop.model.config import ModelConfig
    from sheepop.model.transformer import flops_per_token, num_params

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    args = ModelConfig.from_dict(cfg["model"])
    assert model["parameters"].startswith(f"{num_params(args):,}")
    assert model["training FLOPs/token"].startswith(f"{int(flops_per_token(args, 128)):,}")
    assert model["status"] == "finished" and model["steps"] == "30 / 30"

    events = table_with(page, "event")
    assert [row[0] for row in events[1:]] == ["start", "checkpoint", "end"]
    html = (run / "report.html").read_text()
    for step in (10, 20, 30):  # samples at each eval (trainer=quick: every 10 steps)
        assert f"<h3>step {step}</h3>" in html
    assert "final sample (sample.txt)" in html


def test_report_log_x_and_out_dir(run, tmp_path):
    out = tmp_path / "elsewhere"
    write_report(run, out=out, log_x=True)
    assert (out / "report.html").is_file() and (out / "report_files/loss.png").is_file()
    assert (out / "report_files/loss.png").read_bytes() != (run / "report_files/loss.png").read_bytes()
