"""Byte-level BPE from Hugging Face `tokenizers`: train on the corpus or load a tokenizer.json.

Byte-level means every UTF-8 string round-trips exactly: the 256 byte symbols are always in
the alphabet, and special tokens get their own ids outside them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sheepop.model.config import EOT  # noqa: F401 (the separator, from its one definition)


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: "def" at the start of a file and after a newline encode alike.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def check_file(path: str | Path, setting: str) -> None:
    """One UserError line when a file is not a tokenizer the tokenizers library can load."""
    from sheepop.errors import UserError

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{setting}={path}: not a tokenizer.json the tokenizers library can read ({first}); "
                        "valid: a Hugging Face tokenizers JSON file (e.g. a run's tokenizer.json)") from None


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def eot_token(cfg) -> str:
    """The document separator of a config (a Config, or the plain dict a run or checkpoint saved;
    runs from before tokenizer.eot existed used <|endoftext|>)."""
    tok = cfg["tokenizer"] if isinstance(cfg, dict) else cfg.tokenizer
    return (tok.get("eot") if isinstance(tok, dict) else tok.eot) or EOT


def eot_id(tok: Tokenizer, token: str = EOT) -> int:
    """The id of the document separator (tokenizer.eot); one line when the tokenizer lacks it."""
    i = tok.token_to_id(token)
    if i is None:
        from sheepop.errors import UserError

        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special][:8]
        raise UserError(f"tokenizer.eot={token}: not a token of this tokenizer, and sheepop puts it "
                        f"between documents; valid: one of its tokens, e.g. its special tokens {specials}")
    return i
