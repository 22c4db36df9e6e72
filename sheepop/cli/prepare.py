"""`sheepop prepare [hydra overrides]`: read, clean, deduplicate, tokenize and shard a corpus."""
from __future__ import annotations

from sheepop.cli.args import hydra_help, wants_help


def main(argv: list[str]) -> int:
    if wants_help(argv):
        return hydra_help(argv, "prepare")
    from sheepop.config import compose
    from sheepop.data.shards import prepare

    cfg = compose(argv)
    manifest = prepare(cfg)
    sp = manifest["splits"]
    print(f"{cfg.data.out_dir}: {manifest['documents']} documents, {manifest['tokens']:,} tokens "
          f"(train {sp['train']['tokens']:,}, val {sp['val']['tokens']:,}), vocab {manifest['tokenizer']['vocab_size']}")
    return 0
