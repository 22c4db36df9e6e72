"""The core subcommands: train, prepare, generate, export-weights."""
from __future__ import annotations

import sys
from pathlib import Path

from sheepop.errors import UserError


def _compose(argv: list[str]) -> dict:
    from sheepop.config import compose, to_dict

    return to_dict(compose(argv))


def hydra_help(argv: list[str], command: str) -> int:
    """Hydra's own --help (config groups and the composed config), via a throwaway @hydra.main app."""
    import hydra

    from sheepop.config import conf_dir

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _app(_cfg):  # pragma: no cover - Hydra exits after printing help
        pass

    saved = sys.argv
    sys.argv = [f"sheepop {command}", *argv, "hydra.help.app_name=sheepop " + command,
                "hydra/hydra_logging=disabled", "hydra/job_logging=disabled"]
    try:
        _app()
    finally:
        sys.argv = saved
    return 0


def train(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "--hydra-help") for a in argv):
        return hydra_help(argv, "train")
    cfg = _compose(argv)
    if "--cfg" in argv:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    from sheepop.runner import run

    result = run(cfg)
    return 130 if result.get("stopped") else 0


def prepare(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        return hydra_help(argv, "prepare")
    from sheepop.data.shards import prepare as do_prepare

    cfg = _compose(argv)
    manifest = do_prepare(cfg)
    sp = manifest["splits"]
    print(f"{cfg['data']['out_dir']}: {manifest['documents']} documents, {manifest['tokens']:,} tokens "
          f"(train {sp['train']['tokens']:,}, val {sp['val']['tokens']:,}), vocab {manifest['tokenizer']['vocab_size']}")
    return 0


def parse_kv(argv: list[str], spec: dict[str, type], command: str) -> dict:
    """key=value options of the non-Hydra commands; unknown keys fail with the valid ones."""
    out: dict = {}
    for a in argv:
        if a.startswith("--") and a[2:] in spec and spec[a[2:]] is bool:
            out[a[2:]] = True
            continue
        if "=" not in a:
            raise UserError(f"'{a}': expected key=value; valid keys: {', '.join(spec)}")
        k, v = a.split("=", 1)
        k = k.lstrip("-")
        if k not in spec:
            raise UserError(f"unknown option '{k}'; valid for {command}: {', '.join(spec)}")
        typ = spec[k]
        try:
            out[k] = (v.lower() in ("1", "true", "yes")) if typ is bool else typ(v)
        except ValueError:
            raise UserError(f"{k}={v}: expected {typ.__name__}") from None
    return out


GENERATE_OPTS = {"run.dir": str, "prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int,
                 "top_p": float, "seed": int, "greedy": bool, "no_cache": bool, "num_samples": int}


def generate(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print("usage: sheepop generate run.dir=DIR [prompt='def '] [max_new_tokens=100] [temperature=0.8] "
              "[top_k=40] [top_p=1.0] [greedy=true] [seed=0] [num_samples=1] [no_cache=true]")
        return 0
    o = parse_kv(argv, GENERATE_OPTS, "generate")
    if "run.dir" not in o:
        raise UserError("generate needs run.dir=DIR (a training run's folder or a checkpoint)")
    for key, ok, valid in (("temperature", lambda v: v >= 0, ">= 0 (0 = greedy)"), ("top_k", lambda v: v >= 0, ">= 0"),
                           ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"), ("num_samples", lambda v: v >= 1, ">= 1"),
                           ("max_new_tokens", lambda v: v >= 1, ">= 1")):
        if key in o and not ok(o[key]):
            raise UserError(f"{key}={o[key]}: must be {valid}")
    from sheepop.model.generate import encode_prompt, generate as gen
    from sheepop.train.checkpoint import load_model

    model, tok, meta = load_model(o["run.dir"])
    prompt = o.get("prompt", "def ")
    ids = encode_prompt(tok, prompt, model.args.vocab_size)  # UserError for characters it cannot encode
    n = o.get("max_new_tokens", 100)
    n = max(1, min(n, model.args.max_seq_len - 1))
    temperature = 0.0 if o.get("greedy") else o.get("temperature", 0.8)
    outs = gen(model, [ids] * o.get("num_samples", 1), n, temperature=temperature, top_k=o.get("top_k", 40),
               top_p=o.get("top_p", 1.0), seed=o.get("seed", 0), use_cache=not o.get("no_cache"),
               eos_id=tok.token_to_id("<|endoftext|>"))
    for i, out in enumerate(outs):
        if len(outs) > 1:
            print(f"--- sample {i + 1} (step {meta['step']})")
        print(prompt + tok.decode(out))
    return 0


def export_weights(argv: list[str]) -> int:
    o = parse_kv(argv, {"run.dir": str, "out": str}, "export-weights")
    if "run.dir" not in o:
        raise UserError("export-weights needs run.dir=DIR")
    import torch

    from sheepop.train.checkpoint import load_model

    model, tok, meta = load_model(o["run.dir"])
    out = Path(o.get("out") or Path(o["run.dir"]) / "model.pt")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": meta["config"], "step": meta["step"]}, out)
        tok.save(str(out.with_name("tokenizer.json")))  # generate run.dir=<out> finds it beside the weights
    except OSError as e:
        raise UserError(f"out={out}: cannot write there ({e.strerror or e}); valid: a writable path") from None
    print(f"wrote {out} (fp32, step {meta['step']}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
