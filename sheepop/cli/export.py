"""`sheepop export run.dir=DIR format=pt|hf [out=PATH] [dtype=fp32|bf16] [--force]`.

  format=hf   a Hugging Face Llama folder that `AutoModelForCausalLM` / `AutoTokenizer` load as is
              (sheepop/model/hf.py holds the mapping)
  format=pt   consolidated fp32 weights in one `model.pt` (+ tokenizer.json beside it) that
              `sheepop generate run.dir=model.pt` and plain torch load, no DeepSpeed needed

An existing `out` is refused unless --force (and replaced only once the new one is complete); the run
being exported, or a place inside its checkpoints, is refused even with --force.
"""
from __future__ import annotations

import os
from pathlib import Path

from sheepop.cli.args import parse_kv, require, wants_help
from sheepop.errors import UserError

OPTS = {"run.dir": str, "format": str, "out": str, "dtype": str, "force": bool}
FORMATS = ("hf", "pt")
USAGE = ("usage: sheepop export run.dir=DIR format=hf|pt [out=PATH] [dtype=fp32|bf16] [--force]\n"
         "  format=hf: a Hugging Face Llama folder (model.safetensors, config.json, tokenizer files); out= required\n"
         "  format=pt: consolidated fp32 weights (model.pt + tokenizer.json); out defaults to RUN_DIR/model.pt")


def _checked_out(out, run_dir: str, kind: str, force: bool):
    """out= fit to be written: never the run being exported (or a folder holding it), never inside
    a checkpoints/ folder (it would change what that folder holds), --force to replace. A Path, or
    for object storage the normalized URI."""
    from sheepop import output_paths, storage

    if storage.is_uri(str(out)):
        return _checked_uri(storage.normalize(str(out)), run_dir, force)
    if storage.is_uri(run_dir):
        return output_paths.check(out, "out", kind=kind, force=force)
    run = Path(run_dir).expanduser()
    checkpoints = [p for p in (run, *run.resolve().parents) if p.name == "checkpoints"] + [run / "checkpoints"]
    return output_paths.check(out, "out", kind=kind, force=force, keep=((run, "the run being exported"),),
                              not_inside=tuple((c, "a run's checkpoints") for c in checkpoints))


def _checked_uri(out: str, run_dir: str, force: bool) -> str:
    """The same refusals for an out= in object storage, by URI."""
    from sheepop import storage

    storage.check_writable(out.rsplit("/", 1)[0], "out")
    run = storage.normalize(run_dir).rstrip("/")
    if storage.is_uri(run) and (run == out or run.startswith(out + "/")):
        raise UserError(f"out={out} would replace the run being exported ({run}); give a path outside it")
    if "/checkpoints/" in out + "/" and storage.is_uri(run) and out.startswith(run + "/"):
        raise UserError(f"out={out} is inside a run's checkpoints ({run}/checkpoints); give a path outside it")
    if storage.exists(out) and not force:
        raise UserError(f"out={out} already exists; pass --force to replace it")
    return out


def _to_storage(write, out: str, kind: str) -> None:
    """write(local path) into a temporary folder, then upload it to `out` (a folder, or a file and
    the tokenizer.json beside it); what `out` held before goes only once the new one is written."""
    import tempfile

    from sheepop import storage

    with tempfile.TemporaryDirectory(prefix="sheepop-export-") as tmp:
        if kind == "folder":
            before = storage.sizes(out)  # --force: what an earlier export left, removed once the new one is up
            write(Path(tmp) / "out")
            written = [str(p.relative_to(Path(tmp) / "out")) for p in (Path(tmp) / "out").rglob("*") if p.is_file()]
            storage.upload(Path(tmp) / "out", out, written)
            for stale in set(before) - set(written):
                storage.remove(storage.join(out, stale))
        else:
            name = storage.name(out)
            write(Path(tmp) / name)
            storage.upload(Path(tmp), out.rsplit("/", 1)[0], [name, "tokenizer.json"])


def _same_tokenizer(path: Path, tok) -> bool:
    import json

    try:
        return json.loads(path.read_text()) == json.loads(tok.to_str())
    except (OSError, ValueError):
        return False


def export_hf(run_dir: str, out, *, dtype: str = "fp32", force: bool = False) -> tuple:
    """Export a run's latest checkpoint (or a step_N folder); returns (where it went: a Path or a
    URI, the checkpoint's meta: step, path, config)."""
    from sheepop.model.hf import write_hf
    from sheepop.train.checkpoint import load_model

    out = _checked_out(out, run_dir, "folder", force)
    from sheepop.data.tokenizer import eot_token

    model, tok, meta = load_model(run_dir)
    try:
        if isinstance(out, str):  # object storage
            _to_storage(lambda p: write_hf(model, tok, p, dtype=dtype, eot=eot_token(meta["config"])), out, "folder")
        else:
            write_hf(model, tok, out, dtype=dtype, eot=eot_token(meta["config"]))
    except OSError as e:
        raise UserError(f"out={out}: cannot write there ({e.strerror or e}); valid: a writable folder") from None
    return out, meta


def export_pt(run_dir: str, out: Path | None, *, force: bool = False) -> tuple[Path, dict, int]:
    """model.pt (fp32 state dict, config, step) + tokenizer.json beside it; returns (path, meta, params)."""
    from sheepop import storage
    from sheepop.train.checkpoint import load_model

    out = _checked_out(out or storage.join(run_dir, "model.pt"), run_dir, "file", force)
    model, tok, meta = load_model(run_dir)
    if isinstance(out, str):  # object storage
        _to_storage(lambda p: _write_pt(model, tok, meta, p), out, "file")
        return out, meta, sum(p.numel() for p in model.parameters())
    beside = out.with_name("tokenizer.json")
    if beside.exists() and not force and not _same_tokenizer(beside, tok):  # someone else's tokenizer.json
        raise UserError(f"out={out}: {beside} already exists (another tokenizer); pass --force to replace it, "
                        f"or give out= in another folder")
    try:
        _write_pt(model, tok, meta, out)
    except OSError as e:
        raise UserError(f"out={out}: cannot write there ({e.strerror or e}); valid: a writable path") from None
    return out, meta, sum(p.numel() for p in model.parameters())


def _write_pt(model, tok, meta: dict, out: Path) -> None:
    """model.pt (fp32 state dict, config, step) and tokenizer.json beside it, which
    `generate run.dir=<out>` reads; the weights appear whole or not at all."""
    import torch

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # a dotfile: never mistaken for the export
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": meta["config"], "step": meta["step"]}, tmp)
        tok.save(str(out.with_name("tokenizer.json")))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(USAGE)
        return 0
    o = parse_kv(argv, OPTS, "export")
    fmt = o.get("format", "hf")
    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: unknown export format; valid: {', '.join(FORMATS)}")
    require(o, ("run.dir", "out") if fmt == "hf" else ("run.dir",), USAGE.splitlines()[0])
    dtype = o.get("dtype", "fp32")
    from sheepop.model.hf import DTYPES

    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}; valid: {', '.join(DTYPES)}")
    if fmt == "pt":
        if dtype != "fp32":
            raise UserError(f"dtype={dtype}: format=pt writes fp32 weights; valid: fp32 (or format=hf dtype=bf16)")
        out, meta, n = export_pt(o["run.dir"], o.get("out"), force=bool(o.get("force")))
        print(f"wrote {out} (fp32, step {meta['step']}, {n:,} parameters)")
        return 0
    out, meta = export_hf(o["run.dir"], o["out"], dtype=dtype, force=bool(o.get("force")))
    load = "" if isinstance(out, str) else (f"\n  load: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
                                            f"AutoTokenizer.from_pretrained({str(out)!r})")
    print(f"wrote {out} (Hugging Face Llama, {dtype}, step {meta['step']} of {meta['path']}){load}")
    return 0
