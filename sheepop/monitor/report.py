"""A run's report: report.html (one self-contained file, plots embedded as base64 PNG) and
report.md (plots beside it in report_files/) for a finished or running run. The command is
sheepop.cli.report (`sheepop report RUN_DIR`).

Everything comes from files the run already wrote: config.yaml, metrics.jsonl, tokenizer.json,
checkpoints/*/meta.json, sample.txt, and the data manifest in the config's data.out_dir. No
W&B, no Ray, no GPU.
"""
from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sheepop.errors import UserError
from sheepop.monitor.metrics_file import latest_per_step, read_metrics
from sheepop.units import duration, human

TOKENIZER_EXAMPLES = ["cat", "caterpillar", " the", "tokenization", "unbelievably",
                      "    for i in range(10):", "    return self._cache[key]"]
EVENTS = ("start", "resume", "checkpoint", "checkpoint_skipped", "save_requested", "spike", "rollback", "hang",
          "diverged", "stop", "end")


@dataclass
class Section:
    title: str
    html: str
    md: str


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # file name → PNG

    def add(self, title: str, html_: str, md: str) -> None:
        self.sections.append(Section(title, html_, md))


# ---------------------------------------------------------------------------------------------
# formatting helpers
def esc(x) -> str:
    return html.escape(str(x))


def num(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def nbytes(n: int | None) -> str:
    if n is None:
        return "-"
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def pct(part, whole) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(),
          row_classes: list[str] | None = None) -> tuple[str, str]:
    """(html, markdown) of a table; cells are escaped here; `numeric` columns align right."""
    th = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for j, r in enumerate(rows):
        cls = f" class='{row_classes[j]}'" if row_classes and row_classes[j] else ""
        tds = "".join(f"<td{' class=num' if i in numeric else ''}>{esc(c)}</td>" for i, c in enumerate(r))
        body.append(f"<tr{cls}>{tds}</tr>")
    head = f"<thead><tr>{th}</tr></thead>" if any(headers) else ""
    h = f"<table>{head}<tbody>{''.join(body)}</tbody></table>"
    md_rows = ["| " + " | ".join(map(str, headers)) + " |",
               "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|"]
    md_rows += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return h, "\n".join(md_rows)


def kv_table(pairs: list[tuple[str, str]]) -> tuple[str, str]:
    return table(["", ""], [list(p) for p in pairs])


def image(rep: Report, name: str, png: bytes, alt: str) -> tuple[str, str]:
    rep.images[name] = png
    b64 = base64.b64encode(png).decode()
    return (f"<figure><img alt='{esc(alt)}' src='data:image/png;base64,{b64}'></figure>",
            f"![{alt}](report_files/{name})")


def when(t: float | None, t0: float | None) -> str:
    if t is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{stamp} (+{duration(t - t0)})" if t0 is not None else stamp


# ---------------------------------------------------------------------------------------------
# sections
def summary_section(rep: Report, cfg: dict, rows: list[dict]) -> None:
    events = [r for r in rows if r.get("event") in EVENTS]
    steps = [r for r in rows if "event" not in r]
    last_ev = next((r["event"] for r in reversed(events) if r["event"] in ("start", "resume", "end")), None)
    status = {"end": "finished", None: "no events"}.get(last_ev, "running (or died without an `end` event)")
    if last_ev == "end" and events[-1].get("stopped"):
        status = "stopped early (Ctrl-C or STOP file)"
    # Every number takes the last record of a step: steps re-run after a restart count once.
    lsteps, loss = latest_per_step(rows, "loss")
    vsteps, vloss = latest_per_step(rows, "val_loss")
    _, tps = latest_per_step(rows, "tokens_per_sec", skip_warmup=True)
    _, mfu = latest_per_step(rows, "mfu", skip_warmup=True)
    _, step_time = latest_per_step(rows, "step_time", skip_warmup=True)
    _, mem = latest_per_step(rows, "mem_allocated")
    t0 = rows[0].get("time") if rows else None
    t1 = rows[-1].get("time") if rows else None
    # where the run is: its latest step line (of the latest attempt), with the job's token count then
    last = steps[-1] if steps else {}
    restarts = max(0, sum(1 for r in events if r["event"] in ("start", "resume")) - 1)
    rerun = sum(1 for r in steps if r.get("loss") is not None) - len(lsteps)
    pairs = [
        ("status", status),
        ("steps", f"{last.get('step', 0):,} / {cfg['trainer']['max_steps']:,}"),
        ("tokens seen", num(last.get("tokens"))),
        ("final train loss", num(loss[-1]) if loss else "-"),
        ("final validation loss", f"{num(vloss[-1])} (perplexity {num(math.exp(min(vloss[-1], 50)))}) at step {vsteps[-1]:,}"
         if vloss else "-"),
        ("median tokens/s", f"{median(tps):,.0f}" if tps else "-"),
        ("median MFU", f"{100 * median(mfu):.2f}%" if mfu else "-"),
        ("median step time", duration(median(step_time)) if step_time else "-"),
        ("peak memory (max over ranks)", f"{max(mem):.2f} GiB" if mem else "-"),
        ("restarts", f"{restarts}" + (f" ({rerun} step(s) run again, counted once)" if rerun else "")),
        ("wall time (first to last line)", duration(t1 - t0) if t0 and t1 else "-"),
        ("run directory", str(cfg["run"]["dir"])),
    ]
    h, md = kv_table(pairs)
    rep.add("Summary", h, md)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def config_section(rep: Report, run_dir: Path) -> None:
    text = (run_dir / "config.yaml").read_text()
    rep.add("Resolved config", f"<details open><summary>config.yaml (secrets redacted)</summary><pre>{esc(text)}</pre></details>",
            f"```yaml\n{text.rstrip()}\n```")


RUN_EVENT_KEYS = ("world_size", "micro_batch", "grad_accum", "global_batch", "tokens_per_step", "flops_per_token")


def run_numbers(cfg: dict, rows: list[dict]) -> dict:
    """The batch and FLOPs the run itself logged in its latest start/resume event (what it really
    ran with); computed from the saved config only for a run that never logged one."""
    event = next((r for r in reversed(rows) if r.get("event") in ("start", "resume")), {})
    if all(event.get(k) is not None for k in RUN_EVENT_KEYS):
        return {k: event[k] for k in RUN_EVENT_KEYS}
    from sheepop.config import batch_plan, from_dict
    from sheepop.model.config import ModelConfig
    from sheepop.model.transformer import flops_per_token

    world = event.get("world_size") or cfg["cluster"]["num_workers"]
    bp = batch_plan(from_dict(cfg), world)
    return {"world_size": world, "micro_batch": bp.micro_batch_size, "grad_accum": bp.grad_accum_steps,
            "global_batch": bp.global_batch_size, "tokens_per_step": bp.tokens_per_step,
            "flops_per_token": flops_per_token(ModelConfig.from_dict(cfg["model"]), bp.seq_len)}


def model_section(rep: Report, cfg: dict, rows: list[dict]) -> None:
    from sheepop.model.config import ModelConfig
    from sheepop.model.transformer import num_params

    m = ModelConfig.from_dict(cfg["model"])
    start = next((r for r in reversed(rows) if r.get("event") in ("start", "resume")), {})
    run = run_numbers(cfg, rows)
    fpt, tokens, glob = run["flops_per_token"], run["tokens_per_step"], run["global_batch"]
    peak = next((r["peak_flops"] for r in reversed(rows) if r.get("peak_flops")), None)
    params = num_params(m)
    pairs = [
        ("parameters", f"{num(params)} ({human(params)})"),
        ("non-embedding parameters", f"{num(num_params(m, embedding=False))}"),
        ("shape", f"{m.n_layers} layers × d_model {m.d_model}, {m.n_heads} heads "
                  f"({m.n_kv_heads} KV), SwiGLU {m.d_ff}, context {m.max_seq_len}, vocab {m.vocab_size}"),
        ("training FLOPs/token", f"{num(int(fpt))} ({human(fpt, 'FLOP')}; 6 × matmul params + attention)"),
        ("tokens/step", f"{tokens:,} = global batch {glob} × seq {tokens // glob}"),
        ("ranks × micro batch × accumulation", f"{run['world_size']} × {run['micro_batch']} × {run['grad_accum']}"),
        ("precision", str(start.get("precision", cfg["trainer"]["precision"])).replace("torch.", "")),
        ("ZeRO stage", str(cfg["parallelism"]["zero_stage"])),
        ("peak FLOP/s per rank (for MFU)", human(peak, "FLOP/s") if peak else "-"),
    ]
    h, md = kv_table(pairs)
    rep.add("Model", h, md)


def funnel_section(rep: Report, cfg: dict, run_dir: Path, rows: list[dict] | None = None) -> None:
    mixture = cfg["data"].get("mixture") or []
    if not mixture:
        return _funnel(rep, Path(cfg["data"]["out_dir"]), run_dir, "Data funnel", "data.out_dir of this run")
    from sheepop import storage

    mixture_section(rep, mixture, rows or [])
    for i, src in enumerate(mixture):
        out = src["out_dir"]
        local = storage.cache_dir(out) if storage.is_uri(out) else Path(out)
        _funnel(rep, local, run_dir, f"Data funnel: {src.get('name') or i}", f"data.mixture[{i}] of this run")


def mixture_section(rep: Report, mixture: list[dict], rows: list[dict]) -> None:
    """data.mixture: each source's weight, and the tokens it gave to training (the last logged step)."""
    last = next((r for r in reversed(rows) if "event" not in r and any(k.startswith("tokens/") for k in r)), {})
    seen_all = sum(v for k, v in last.items() if k.startswith("tokens/")) or None
    total = sum(float(s["weight"]) for s in mixture) or 1.0
    val = next((r for r in reversed(rows) if "event" not in r and "val_loss" in r), {})
    table_rows = [[s["name"], f"{float(s['weight']) / total:.1%}", num(last.get(f"tokens/{s['name']}")),
                   pct(last.get(f"tokens/{s['name']}"), seen_all) if seen_all else "-",
                   num(val.get(f"val_loss/{s['name']}")), s["out_dir"]] for s in mixture]
    h, md = table(["source", "weight", "tokens seen", "share seen", "val loss", "prepared in"], table_rows, {1, 2, 3, 4})
    intro = (f"Training windows drawn from {len(mixture)} corpora by weight (data.mixture); tokens seen up to step "
             f"{last.get('step', '-')}, val loss at step {val.get('step', '-')}.")
    rep.add("Data mixture", f"<p>{esc(intro)}</p>{h}", f"{intro}\n\n{md}")


def _funnel(rep: Report, out_dir: Path, run_dir: Path, title: str, what: str) -> None:
    path = out_dir / "manifest.json"
    if not path.is_file():
        note = f"No data manifest at {path} ({what}): it was moved or deleted."
        rep.add(title, f"<p class=warn>{esc(note)}</p>", note)
        return
    m = json.loads(path.read_text())
    rows, classes = [], []
    for st in m.get("funnel", []):
        rows.append([st["stage"], num(st["docs_in"]), num(st["docs_out"]), pct(st["docs_out"], st["docs_in"]),
                     nbytes(st["bytes_in"]), nbytes(st["bytes_out"]), pct(st["bytes_out"], st["bytes_in"]),
                     num(st["bytes_in"]), num(st["bytes_out"])])
        classes.append("")
    sp = m.get("splits", {})
    for name in ("train", "val"):
        if name in sp:
            s = sp[name]
            rows.append([f"→ {name} split", "", num(s["docs"]), "", "", nbytes(s["bytes"]), "", "", num(s["bytes"])])
            classes.append("split")
    h, md = table(["stage", "docs in", "docs out", "docs kept", "bytes in", "bytes out", "bytes kept",
                   "bytes in (exact)", "bytes out (exact)"], rows, set(range(1, 9)), row_classes=classes)
    tokens = m.get("tokens")
    tok_line = (f"Tokens: {num(tokens)} in all — train {num(sp.get('train', {}).get('tokens'))}, "
                f"val {num(sp.get('val', {}).get('tokens'))}; "
                f"{m['bytes'] / tokens:.2f} bytes per token with a {m['tokenizer']['vocab_size']:,}-token vocabulary."
                if tokens else "")
    warn = ""
    try:
        from sheepop.data.tokenizer import file_hash

        if (run_dir / "tokenizer.json").is_file() and file_hash(run_dir / "tokenizer.json") != m["tokenizer"]["sha256_16"]:
            warn = (f"The manifest's tokenizer differs from this run's tokenizer.json: {out_dir} was prepared "
                    "again since this run, so these numbers may describe other data.")
    except (KeyError, OSError):
        pass
    intro = f"Documents and bytes read from source `{m.get('source', '?')}`, kept by each stage, then tokenized ({path})."
    rep.add(title,
            f"<p>{esc(intro)}</p>{h}<p>{esc(tok_line)}</p>" + (f"<p class=warn>{esc(warn)}</p>" if warn else ""),
            f"{intro}\n\n{md}\n\n{tok_line}" + (f"\n\n**Warning:** {warn}" if warn else ""))


def tokenizer_section(rep: Report, run_dir: Path) -> None:
    path = run_dir / "tokenizer.json"
    if not path.is_file():
        rep.add("Tokenizer", "<p class=warn>no tokenizer.json in the run directory</p>", "no tokenizer.json")
        return
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    html_rows, md_rows = [], []
    for text in TOKENIZER_EXAMPLES:
        ids = tok.encode(text, add_special_tokens=False).ids
        pieces = [tok.decode([i]) for i in ids]
        chips = "".join(f"<span class=tok title='id {i}'>{esc(p).replace(' ', '·')}</span>" for p, i in zip(pieces, ids))
        html_rows.append(f"<tr><td><code class=ws>{esc(repr(text))}</code></td><td class=num>{len(ids)}</td><td>{chips}</td></tr>")
        md_rows.append(f"| `{text!r}` | {len(ids)} | " + " ".join(f"`{p}`" for p in pieces).replace("|", "\\|") + " |")
    h = ("<p>How the run's tokenizer splits a few words and code lines (spaces shown as ·; hover a token for its id). "
         f"Vocabulary: {tok.get_vocab_size():,} tokens.</p>"
         f"<table><thead><tr><th>text</th><th class=num>tokens</th><th>pieces</th></tr></thead><tbody>{''.join(html_rows)}</tbody></table>")
    md = (f"Vocabulary: {tok.get_vocab_size():,} tokens.\n\n| text | tokens | pieces |\n|---|---:|---|\n" + "\n".join(md_rows))
    rep.add("Tokenizer", h, md)


def curves_section(rep: Report, cfg: dict, rows: list[dict], log_x: bool) -> None:
    from sheepop.monitor import plot

    parts = [image(rep, "loss.png", plot.png_bytes(plot.loss_figure(rows, f"{cfg['run']['name']}: next-token loss", log_x)),
                   "train and validation loss"),
             image(rep, "lr.png", plot.png_bytes(plot.lr_figure(rows)), "learning-rate schedule")]
    rep.add("Loss and learning rate", "".join(p[0] for p in parts), "\n\n".join(p[1] for p in parts))
    h, md = image(rep, "throughput.png", plot.png_bytes(plot.throughput_figure(rows)), "throughput, MFU and memory")
    rep.add("Throughput and MFU", h, md)


def checkpoint_root(cfg: dict) -> str:
    """Where the run of a saved config keeps its checkpoints: <storage_path>/<run.name>/checkpoints
    (a folder or a URI), else run.dir/checkpoints."""
    from sheepop import storage

    sp = cfg["cluster"].get("storage_path")
    base = storage.join(sp, cfg["run"]["name"]) if sp else cfg["run"]["dir"]
    return storage.join(storage.normalize(base), "checkpoints")


def events_section(rep: Report, cfg: dict, rows: list[dict]) -> None:
    from sheepop import storage
    from sheepop.train import checkpoint

    t0 = rows[0].get("time") if rows else None
    table_rows, classes = [], []
    attempt = 0  # lines written before MetricsSink stamped each one: the attempt of the latest start/resume
    for r in rows:
        ev = r.get("event")
        if ev in ("start", "resume"):
            attempt = r.get("attempt", attempt)
        if ev not in EVENTS:
            continue
        if ev in ("start", "resume"):
            detail = f"{r.get('world_size', '?')} rank(s)"
            if r.get("checkpoint"):
                detail += f", from {Path(r['checkpoint']).name}"
        elif ev in ("stop", "diverged", "checkpoint_skipped", "save_requested", "spike"):
            detail = r.get("reason", "") + (f" → {r['action']}" if r.get("action") else "")
        elif ev == "rollback":
            detail = f"from step {r.get('from_step')} to {Path(str(r.get('checkpoint'))).name}; skipping steps {r.get('skip_steps')}"
        elif ev == "hang":
            detail = (f"rank {r.get('rank')}: {r.get('phase')} ran {r.get('waited_s')} s (timeout {r.get('timeout_s')} s); "
                      f"slow rank(s) {r.get('slow_ranks')}; stacks in {r.get('dir')}")
        elif ev == "end":
            detail = "stopped early" if r.get("stopped") else "finished"
        else:
            detail = ""
        table_rows.append([ev, num(r.get("step")), str(r.get("attempt", attempt)), when(r.get("time"), t0), detail])
        classes.append("stop" if ev in ("diverged", "hang", "spike") else ev if ev in ("resume", "stop") else "")
    h, md = table(["event", "step", "attempt", "time", "detail"], table_rows, {1, 2}, row_classes=classes)
    ckpt_root = checkpoint_root(cfg)
    kept = checkpoint.list_checkpoints(ckpt_root)
    ck_rows = []
    for p in kept:
        try:
            meta = checkpoint.read_meta(p)
        except (OSError, ValueError):  # a save that did not finish
            continue
        size = sum(storage.sizes(p).values())
        ck_rows.append([storage.name(p), num(meta.get("step")), num(meta.get("tokens")), str(meta.get("world_size", "-")),
                        nbytes(size), "yes" if meta.get("final") else ""])
    ch, cmd = table(["checkpoint", "step", "tokens", "ranks", "size", "final"], ck_rows, {1, 2, 3, 4})
    resumes = sum(1 for r in rows if r.get("event") == "resume")
    intro = f"{resumes} restart(s). Checkpoints kept in {ckpt_root}:"
    rep.add("Checkpoints and restarts", f"{h}<p>{esc(intro)}</p>{ch if ck_rows else '<p>none</p>'}",
            f"{md}\n\n{intro}\n\n{cmd if ck_rows else 'none'}")


def tasks_section(rep: Report, rows: list[dict]) -> None:
    """trainer.eval_tasks: one row per evaluated checkpoint, one column per task metric (nothing when off)."""
    by_step: dict[int, dict] = {}
    for r in rows:
        if r.get("event") == "tasks":
            by_step[r["step"]] = r["scores"]  # a re-run step after a restart replaces the earlier one
    failed = [r for r in rows if r.get("event") == "tasks_failed"]
    if not by_step and not failed:
        return
    keys = sorted({k for scores in by_step.values() for k in scores})
    h, md = table(["step", *(k.removeprefix("tasks/") for k in keys)],
                  [[f"{s:,}", *(num(by_step[s].get(k)) for k in keys)] for s in sorted(by_step)],
                  numeric=set(range(len(keys) + 1)))
    for r in failed:
        note = f"step {r['step']:,}: evaluation failed: {r.get('reason', '')}"
        h, md = h + f"<p>{esc(note)}</p>", md + f"\n\n{note}"
    rep.add("Downstream tasks (lm-evaluation-harness)", h, md)


def samples_section(rep: Report, rows: list[dict], run_dir: Path) -> None:
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        if r.get("event") == "samples":
            by_step[r["step"]] = r["samples"]  # a re-run step after a restart replaces the earlier one
    h_parts, md_parts = [], []
    for step in sorted(by_step):
        items = by_step[step]
        h_parts.append(f"<h3>step {step:,}</h3><div class=samples>" + "".join(
            f"<pre class=sample><b>{esc(s['prompt'])}</b>{esc(s['text'][len(s['prompt']):].rstrip())}</pre>"
            for s in items) + "</div>")
        md_parts.append(f"### step {step:,}\n\n" + "\n\n".join(f"```\n{s['text'].rstrip()}\n```" for s in items))
    final = run_dir / "sample.txt"
    if final.is_file():
        text = final.read_text()
        h_parts.append(f"<h3>final sample (sample.txt)</h3><pre class=sample>{esc(text)}</pre>")
        md_parts.append(f"### final sample (sample.txt)\n\n```\n{text}\n```")
    if not h_parts:
        h_parts, md_parts = ["<p>no samples logged</p>"], ["no samples logged"]
    rep.add("Samples at each evaluation", "".join(h_parts), "\n\n".join(md_parts))


# ---------------------------------------------------------------------------------------------
CSS = """
body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1d1d1f;background:#f6f7f9;margin:0}
main{max-width:980px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 2px}h2{font-size:19px;margin:0 0 10px;color:#111}
h3{font-size:14px;margin:14px 0 6px;color:#444}
.sub{color:#666;margin:0 0 18px}
nav{margin:0 0 18px;font-size:13px}nav a{margin-right:12px;color:#1f5fbf;text-decoration:none}
section{background:#fff;border:1px solid #e3e5e8;border-radius:8px;padding:16px 20px;margin:0 0 16px}
table{border-collapse:collapse;font-size:13px;margin:4px 0 8px}
th,td{padding:4px 10px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{background:#f2f4f7;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
tr.split td{color:#555;background:#fafbfc}tr.resume td{background:#fff7e0}tr.stop td{background:#fdecea}
pre{background:#f6f8fa;border:1px solid #e6e8eb;border-radius:6px;padding:10px;overflow:auto;font-size:12px;
    max-height:420px;white-space:pre-wrap;word-break:break-word}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:8px}
pre.sample{margin:0;max-height:260px}code.ws{white-space:pre}
figure{margin:6px 0}img{max-width:100%;height:auto}
.tok{display:inline-block;padding:1px 4px;margin:1px 2px 1px 0;border-radius:4px;font:12px ui-monospace,monospace;
     background:#dbeafe;white-space:pre}.tok:nth-child(2n){background:#fde2c8}
.warn{color:#9a3412;background:#fff7ed;border:1px solid #fed7aa;padding:6px 10px;border-radius:6px}
summary{cursor:pointer;color:#555}
"""


def to_html(rep: Report, subtitle: str) -> str:
    nav = "".join(f"<a href='#s{i}'>{esc(s.title)}</a>" for i, s in enumerate(rep.sections))
    body = "".join(f"<section id='s{i}'><h2>{esc(s.title)}</h2>{s.html}</section>" for i, s in enumerate(rep.sections))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{esc(rep.title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{esc(rep.title)}</h1><p class=sub>{esc(subtitle)}</p>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")


def to_md(rep: Report, subtitle: str) -> str:
    return f"# {rep.title}\n\n{subtitle}\n\n" + "\n\n".join(f"## {s.title}\n\n{s.md}" for s in rep.sections) + "\n"


def build(run_dir: Path, log_x: bool = False) -> Report:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"RUN_DIR={run_dir}: no config.yaml; pass the run.dir of a training run")
    cfg = yaml.safe_load(cfg_path.read_text())
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"RUN_DIR={run_dir}: metrics.jsonl is missing or empty; has the run started?")
    rep = Report(title=f"sheepop run report: {cfg['run']['name']}")
    summary_section(rep, cfg, rows)
    curves_section(rep, cfg, rows, log_x)
    model_section(rep, cfg, rows)
    funnel_section(rep, cfg, run_dir, rows)
    tokenizer_section(rep, run_dir)
    events_section(rep, cfg, rows)
    tasks_section(rep, rows)
    samples_section(rep, rows, run_dir)
    config_section(rep, run_dir)
    return rep


def write(run_dir: str | Path, out: str | Path | None = None, log_x: bool = False) -> tuple[Path, Path]:
    """Write report.html and report.md (+ report_files/*.png); returns their paths. A run in
    storage (s3://...) is read from a local copy; its report goes to ./report-<run name>/ unless out= says otherwise."""
    from sheepop import storage
    from sheepop.monitor.metrics_file import local_run

    given = str(run_dir)
    storage.check_readable(given, "RUN_DIR")
    run_dir = local_run(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR={given}: no such directory")
    # A run in storage: the report goes to the current folder (not into sheepop's download cache).
    out = Path(out).expanduser() if out else Path(f"report-{storage.name(given)}") if storage.is_uri(given) else run_dir
    rep = build(run_dir, log_x)
    subtitle = f"{run_dir.resolve()} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    out.mkdir(parents=True, exist_ok=True)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    for name, png in rep.images.items():
        (files / name).write_bytes(png)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(to_html(rep, subtitle))
    md_path.write_text(to_md(rep, subtitle))
    return html_path, md_path
