"""`sheepop import DIR out=RUN_DIR [--force]`: a Hugging Face Llama folder → a folder that
`sheepop generate|eval|export run.dir=RUN_DIR` reads.

RUN_DIR gets what `sheepop export format=pt` writes: model.pt (fp32 weights, the config, step 0)
and tokenizer.json beside it. The config is composed as `sheepop train trainer.init_from=hf:DIR`
would compose it, so the same checks refuse a non-Llama folder in one line; training from the
weights is that command (sheepop/model/hf.py holds the mapping).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from sheepop.cli.args import parse_kv, require, wants_help
from sheepop.errors import UserError

OPTS = {"out": str, "force": bool}
USAGE = ("usage: sheepop import DIR out=RUN_DIR [--force]\n"
         "  DIR: a Hugging Face Llama folder (config.json, model.safetensors or its shards, tokenizer.json)\n"
         "  RUN_DIR: gets model.pt + tokenizer.json, for sheepop generate|eval|export run.dir=RUN_DIR")


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(USAGE)
        return 0
    folders = [a for a in argv if "=" not in a and not a.startswith("--")]
    if len(folders) != 1:
        raise UserError(f"expected one DIR, got {len(folders)}; {USAGE.splitlines()[0]}")
    o = parse_kv([a for a in argv if a not in folders], OPTS, "import")
    require(o, ("out",), USAGE.splitlines()[0])
    from sheepop import output_paths

    out = Path(o["out"]).expanduser()  # checked before anything is read
    if (out / "checkpoints").is_dir():  # generate/eval/export there would read the checkpoints, not model.pt
        raise UserError(f"out={o['out']} is a training run (it has checkpoints/), whose checkpoints sheepop "
                        f"generate|eval|export would read instead of the import; give a new folder")
    if out.is_dir() and any(out.iterdir()) and not o.get("force"):
        raise UserError(f"out={out} already exists and is not empty; pass --force to replace its model.pt")
    out = output_paths.check(o["out"], "out", kind="folder", force=True)  # a file, or a parent that is one
    if not (Path(folders[0]).expanduser() / "config.json").is_file():  # in import's words, not train's
        raise UserError(f"DIR={folders[0]}: no config.json there; give a Hugging Face Llama folder "
                        f"(config.json, model.safetensors or its shards, tokenizer.json)")
    import torch

    from sheepop.config import compose, redact
    from sheepop.model.transformer import Transformer
    from sheepop.train.checkpoint import check_hf, load_hf

    cfg = compose([f"trainer.init_from='hf:{folders[0]}'", "cluster=process", "logger=none"])
    check_hf(cfg, training=False)
    model = Transformer(cfg.model)
    load_hf(model, cfg.trainer.init_from[len("hf:"):])
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.pt.tmp"
        torch.save({"model": model.state_dict(), "config": redact(cfg), "step": 0}, tmp)
        shutil.copyfile(cfg.tokenizer.path, out / "tokenizer.json")
        tmp.replace(out / "model.pt")
    except OSError as e:
        raise UserError(f"out={out}: cannot write there ({e.strerror or e}); valid: a writable folder") from None
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/model.pt ({n:,} parameters, fp32) and tokenizer.json from {folders[0]}\n"
          f"  sheepop generate run.dir={out}; train from it: sheepop train trainer.init_from=hf:{folders[0]}")
    return 0
