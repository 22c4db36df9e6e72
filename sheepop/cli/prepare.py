"""`sheepop prepare [hydra overrides]`: read, clean, deduplicate, tokenize and shard a corpus."""
from __future__ import annotations

from sheepop.cli.args import hydra_help, wants_help


def main(argv: list[str]) -> int:
    if wants_help(argv):
        return hydra_help(argv, "prepare")
    from sheepop.config import compose
    from sheepop.data.shards import prepare

    cfg = compose(argv)
    if cfg.data.mixture:  # a mixture is made of corpora prepared one by one: say how, prepare nothing
        from sheepop.errors import UserError

        raise UserError(f"data.mixture is set: `sheepop prepare` prepares one corpus; prepare each source on its "
                        f"own (`sheepop prepare data.out_dir={cfg.data.mixture[0].out_dir} ...`, all with one "
                        "tokenizer: tokenizer.path=<the first one's tokenizer.json>), then train with data.mixture")
    manifest = prepare(cfg)
    sp = manifest["splits"]
    print(f"{cfg.data.out_dir}: {manifest['documents']} documents, {manifest['tokens']:,} tokens "
          f"(train {sp['train']['tokens']:,}, val {sp['val']['tokens']:,}), vocab {manifest['tokenizer']['vocab_size']}")
    return 0
