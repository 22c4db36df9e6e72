"""`sheepop eval run.dir=DIR [split=val|train] [data=... data.paths=[...]]`: loss and perplexity.

Without data overrides it scores a split of the run's own prepared data (data.out_dir from the
run's config). With them (`data=files "data.paths=[notes/,*.md]"`, `data=jsonl ...`, any
data.* key) it prepares that file set the way training would, but with the run's tokenizer
(tokenizer.path = the checkpoint's tokenizer.json), in a temporary folder, and scores every
token of it. Windows are consecutive and non-overlapping (seq_len inputs + 1 target each), so
the number is a deterministic mean over the first max_tokens tokens, not a random sample.

`sheepop eval run.dir=DIR tasks=python_mc[,...] [limit=N] [num_fewshot=K]` runs downstream tasks
with EleutherAI's lm-evaluation-harness instead (the `eval` extra; sheepop.model.lm_eval_adapter):
the tasks shipped in sheepop/eval_tasks, offline. It prints task, metric, value and stderr and
writes the harness's results to RUN/eval/lm_eval_<tasks>.json (or out=FILE; training's
trainer.eval_tasks runs this command on its checkpoints: sheepop.train.task_eval).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from sheepop.cli.args import parse_kv, require, wants_help
from sheepop.errors import UserError

OPTS = {"run.dir": str, "split": str, "max_tokens": int, "batch_size": int, "seq_len": int, "tasks": str,
        "limit": int, "num_fewshot": int, "out": str, "force": bool}
USAGE = ("usage: sheepop eval run.dir=DIR [split=val|train] [max_tokens=200000] [batch_size=8] [seq_len=N]\n"
         "       sheepop eval run.dir=DIR data=files \"data.paths=[notes/,src/**/*.py]\"   (any data.* override)\n"
         "       sheepop eval run.dir=DIR tasks=python_mc[,TASK...] [limit=N] [num_fewshot=K] [batch_size=8] [out=FILE [--force]]"
         "   (lm-evaluation-harness)")
TASK_ONLY = ("tasks", "limit", "num_fewshot", "out", "force")
LOSS_ONLY = ("split", "max_tokens", "seq_len")
DEFAULT_MAX_TOKENS = 200_000


def _is_data_override(arg: str) -> bool:
    key = arg.split("=", 1)[0].lstrip("+~")
    return key == "data" or key.startswith("data.")


def token_stream(data_dir: Path, manifest: dict, splits: list[str]):
    """The splits' shards as memory-mapped arrays, in order."""
    dtype = np.dtype(manifest["dtype"])
    for split in splits:
        for s in manifest["splits"][split]["shards"]:
            yield np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r")


def windows(arrays, seq_len: int, max_tokens: int):
    """Consecutive (seq_len + 1)-token windows, stride seq_len, until max_tokens targets."""
    scored = 0
    for arr in arrays:
        for start in range(0, len(arr) - seq_len, seq_len):
            if max_tokens and scored >= max_tokens:
                return
            yield np.asarray(arr[start:start + seq_len + 1], dtype=np.int64)
            scored += seq_len


def score(model, arrays, *, seq_len: int, max_tokens: int, batch_size: int) -> dict:
    """Mean next-token cross-entropy (nats) over the windows; fp32 on the model's device."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.eval()
    total, count, n_windows = 0.0, 0, 0
    batch: list[np.ndarray] = []

    def flush():
        nonlocal total, count, n_windows
        w = torch.from_numpy(np.stack(batch)).to(device)
        with torch.no_grad():
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
        n_windows += len(batch)
        batch.clear()

    for win in windows(arrays, seq_len, max_tokens):
        batch.append(win)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if count == 0:
        raise UserError(f"too few tokens for one window of {seq_len + 1}; pass a smaller seq_len=N")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count, "windows": n_windows}


def _prepare_files(data_overrides: list[str], tokenizer_json: Path, vocab_size: int, out_dir: Path) -> dict:
    """Prepare a file set with the run's tokenizer into out_dir; returns the manifest."""
    from sheepop.config import compose
    from sheepop.data.shards import prepare

    cfg = compose([*data_overrides, f"model.vocab_size={vocab_size}", f"tokenizer.path={tokenizer_json}",
                   "cluster=process", "logger=none", f"data.out_dir={out_dir}"])
    return prepare(cfg, log=lambda *_: None, progress=False)


def _run_data(out_dir: str) -> Path:
    """The run's prepared data on this machine (a verified local copy when it is in storage)."""
    import json

    from sheepop import storage
    from sheepop.data.shards import verify_prepared

    if not storage.is_uri(out_dir):
        return Path(out_dir)
    try:
        manifest = json.loads(storage.read_text(storage.join(out_dir, "manifest.json")))
    except (OSError, ValueError):
        raise UserError(f"the run's prepared data ({out_dir}) is not there; run `sheepop prepare` with the run's "
                        "data settings, or pass data=... to score files") from None
    return verify_prepared(out_dir, manifest)


def evaluate(run_dir: str, *, split: str = "val", data_overrides: list[str] | None = None,
             max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = 8, seq_len: int = 0) -> dict:
    """Loss and perplexity of a run's latest checkpoint on a split (of each source, for a data.mixture
    run, then their mean by the mixture's weights: as training's val_loss) or a file set."""
    from sheepop.train.checkpoint import load_model

    model, tok, meta = load_model(run_dir)
    cfg = meta["config"]
    seq = seq_len or cfg["trainer"].get("seq_len") or model.args.max_seq_len
    if not 1 <= seq <= model.args.max_seq_len:
        raise UserError(f"seq_len={seq} must be in [1, model.max_seq_len={model.args.max_seq_len}]")
    ckpt_tok = Path(meta["local"]) / "tokenizer.json"
    t0 = time.time()
    if data_overrides:
        result, what = _score_files(model, data_overrides, ckpt_tok, seq, max_tokens, batch_size)
    elif split not in ("train", "val"):
        raise UserError(f"split={split}; valid: train, val")
    elif cfg["trainer"].get("init_from") and meta["step"] == 0:  # `sheepop import`'s model.pt: no data of its own
        raise UserError(f"run.dir={run_dir} holds imported weights ({cfg['trainer']['init_from']}), which have no "
                        f"prepared data of their own; pass data=... \"data.paths=[...]\" to score files")
    elif mixture := cfg["data"].get("mixture") or []:
        # a data.mixture run: each source's split, then their mean by the mixture's weights
        total = sum(float(s["weight"]) for s in mixture)
        sources = []
        for s in mixture:
            r = _score_split(model, s["out_dir"], split, ckpt_tok, seq, max_tokens, batch_size)
            sources.append({**r, "name": s["name"], "weight": float(s["weight"]) / total})
        loss = sum(s["weight"] * s["loss"] for s in sources)
        result = {"loss": loss, "perplexity": math.exp(loss), "tokens": sum(s["tokens"] for s in sources),
                  "windows": sum(s["windows"] for s in sources), "sources": sources}
        what = f"{split} split of the data mixture (weighted by {', '.join(s['name'] for s in sources)})"
    else:
        result = _score_split(model, cfg["data"]["out_dir"], split, ckpt_tok, seq, max_tokens, batch_size)
        what = f"{split} split of {result.pop('data_dir')}"
    return {**result, "what": what, "seq_len": seq, "step": meta["step"], "checkpoint": meta["path"],
            "seconds": time.time() - t0}


def _score_files(model, data_overrides: list[str], ckpt_tok: Path, seq: int, max_tokens: int,
                 batch_size: int) -> tuple[dict, str]:
    """(the score, what was scored) of a file set, prepared with the checkpoint's tokenizer in a temp folder."""
    with tempfile.TemporaryDirectory(prefix="sheepop-eval-") as tmp:
        data_dir = Path(tmp) / "data"
        manifest = _prepare_files(data_overrides, ckpt_tok, model.args.vocab_size, data_dir)
        sp = manifest["splits"]
        # Every document lands in train or val, except that a one-document corpus is both.
        both = sp["train"]["docs"] + sp["val"]["docs"] <= manifest["documents"]
        splits = ["train", "val"] if both else ["train"]
        result = score(model, token_stream(data_dir, manifest, splits), seq_len=seq, max_tokens=max_tokens,
                       batch_size=batch_size)
        del manifest  # memmaps close with the arrays; the temp folder goes next
    return result, "files " + " ".join(data_overrides)


def _score_split(model, out_dir: str, split: str, ckpt_tok: Path, seq: int, max_tokens: int, batch_size: int) -> dict:
    """Loss of the model on one split of a run's prepared data (checked against the checkpoint's tokenizer)."""
    from sheepop.data.shards import load_manifest
    from sheepop.data.tokenizer import file_hash

    data_dir = _run_data(out_dir)
    if not (data_dir / "manifest.json").is_file():
        raise UserError(f"the run's prepared data ({data_dir}) is not there (relative paths are from the "
                        f"directory training ran in); run `sheepop prepare` with the run's data and tokenizer "
                        f"settings, or pass data=... to score files")
    manifest = load_manifest(data_dir)
    if manifest["tokenizer"]["sha256_16"] != file_hash(ckpt_tok):
        raise UserError(f"{data_dir} was prepared with a different tokenizer than the checkpoint's; "
                        "prepare it again with tokenizer.path=<checkpoint>/tokenizer.json or pass data=...")
    result = score(model, token_stream(data_dir, manifest, [split]), seq_len=seq, max_tokens=max_tokens,
                   batch_size=batch_size)
    return {**result, "data_dir": str(data_dir)}


def _results_location(run_dir: str, checkpoint: str) -> str:
    """The run's folder for eval/: the one above checkpoints/step_N, model.pt's folder, else run.dir."""
    from sheepop import storage

    ckpt = storage.normalize(checkpoint).rstrip("/")
    parent = ckpt.rsplit("/", 1)[0] if "/" in ckpt else "."
    if storage.name(parent) == "checkpoints":
        return parent.rsplit("/", 1)[0] if "/" in parent else "."
    if storage.name(ckpt) == "model.pt":
        return parent
    return run_dir


def lm_eval_tasks(run_dir: str, tasks: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                  batch_size: int = 8, out: str | None = None) -> dict:
    """Run lm-evaluation-harness tasks shipped with sheepop on a run's latest checkpoint; returns
    {"rows": [(task, metric, value, stderr)], "results": the harness's dict, "out": the JSON written, ...}."""
    import json

    from sheepop import storage
    from sheepop.logs import logs_dir, output_to
    from sheepop.train.checkpoint import load_model

    try:
        from sheepop.model import lm_eval_adapter as adapter
    except ImportError as e:
        raise UserError(f"tasks= needs EleutherAI's lm-evaluation-harness ({e}); install it with "
                        "pip install 'sheepop[eval]' (or pip install 'lm-eval>=0.4')") from None
    valid = adapter.available_tasks()
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise UserError(f"tasks={','.join(tasks)}: no such task {', '.join(unknown)}; valid: {', '.join(valid)}")
    from sheepop.data.tokenizer import eot_token

    model, tok, meta = load_model(run_dir)
    t0 = time.time()
    where = _results_location(run_dir, meta["path"])
    # The harness's progress bars and the git it runs for its own version go to the run's log, not the screen.
    log = (Path(tempfile.gettempdir()) if storage.is_uri(where) else logs_dir(where)) / "lm_eval.log"
    with output_to(log):
        results = adapter.run_tasks(model, tok, tasks, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
                                    eot=eot_token(meta["config"]))
    rows = adapter.result_rows(results)
    out = out or storage.join(where, "eval", f"lm_eval_{'+'.join(tasks)}.json")
    record = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "step": meta["step"],
              "checkpoint": meta["path"], "seconds": time.time() - t0,
              "table": [dict(zip(("task", "metric", "value", "stderr"), r)) for r in rows],
              "lm_eval": {k: results.get(k) for k in ("results", "versions", "n-shot", "higher_is_better",
                                                      "n-samples", "config", "lm_eval_version", "date")
                          if k in results}}
    storage.write_text(out, json.dumps(record, indent=2, default=str) + "\n")
    return {"rows": rows, "results": results, "out": out, "step": meta["step"], "seconds": record["seconds"]}


def format_table(rows: list[tuple[str, str, float, float | None]]) -> str:
    header = ("task", "metric", "value", "stderr")
    cells = [header] + [(t, m, f"{v:.4f}", "" if e is None else f"{e:.4f}") for t, m, v, e in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) if i < 2 else c[i].rjust(widths[i]) for i in range(4)).rstrip()
                     for c in cells)


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(USAGE)
        return 0
    data_overrides = [a for a in argv if _is_data_override(a)]
    o = parse_kv([a for a in argv if not _is_data_override(a)], OPTS, "eval (or data=..., data.*=...)")
    require(o, ("run.dir",), "eval needs a training run's folder or a checkpoint")
    if data_overrides and "split" in o:
        raise UserError("split= scores the run's own data; with data=... every token of the files is scored")
    for key in ("max_tokens", "batch_size", "seq_len", "limit"):
        if key in o and o[key] < 1:
            raise UserError(f"{key}={o[key]}: must be >= 1" + (" (or leave it out: the model's context)"
                                                               if key == "seq_len" else ""))
    if o.get("num_fewshot", 0) < 0:
        raise UserError(f"num_fewshot={o['num_fewshot']}: must be >= 0")
    if "tasks" in o:
        clash = [k for k in LOSS_ONLY if k in o] + (["data=..."] if data_overrides else [])
        if clash:
            raise UserError(f"tasks= runs lm-evaluation-harness tasks; {', '.join(clash)} belong to the loss "
                            "evaluation (drop them or tasks=)")
        tasks = [t.strip() for t in o["tasks"].split(",") if t.strip()]
        if not tasks:
            raise UserError("tasks= is empty; name at least one task (e.g. tasks=python_mc)")
        out = o.get("out")
        if out is not None:  # checked now: the evaluation takes minutes
            from sheepop import output_paths, storage

            if not storage.is_uri(out):
                out = str(output_paths.check(out, "out", kind="file", force=bool(o.get("force"))))
        r = lm_eval_tasks(o["run.dir"], tasks, limit=o.get("limit"), num_fewshot=o.get("num_fewshot"),
                          batch_size=o.get("batch_size", 8), out=out)
        print(format_table(r["rows"]))
        print(f"step {r['step']}, {r['seconds']:.1f}s; results: {r['out']}")
        return 0
    stray = [k for k in TASK_ONLY if k in o]
    if stray:
        raise UserError(f"{', '.join(stray)} go with tasks=...; valid without it: {', '.join(k for k in OPTS if k not in TASK_ONLY)}")
    r = evaluate(o["run.dir"], split=o.get("split", "val"), data_overrides=data_overrides,
                 max_tokens=o.get("max_tokens", DEFAULT_MAX_TOKENS), batch_size=o.get("batch_size", 8),
                 seq_len=o.get("seq_len", 0))
    for s in r.get("sources", []):  # a data.mixture run: each source, then their weighted mean
        print(f"  {s['name']} ({s['weight']:.1%}): loss {s['loss']:.4f}, perplexity {s['perplexity']:.2f} "
              f"({s['tokens']:,} tokens in {s['windows']:,} windows)")
    print(f"{r['what']}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} "
          f"({r['tokens']:,} tokens in {r['windows']:,} windows of {r['seq_len']}; step {r['step']}, "
          f"{r['seconds']:.1f}s)")
    return 0
