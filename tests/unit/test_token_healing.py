"""Token healing: a prompt ending mid-token (here: in a space) backs up one token, and the first
new token must start with the text that was dropped."""
from __future__ import annotations

import torch

from sheepop.data.tokenizer import train_bpe
from sheepop.model.config import ModelConfig
from sheepop.model.generate import complete, generate, heal_prompt
from sheepop.model.transformer import Transformer

CORPUS = ["def foo(x):\n    return x + 1\n", "def bar(y):\n    return y * 2\n"] * 50


def _tok():
    return train_bpe(CORPUS, 300, ["<|endoftext|>", "<|pad|>"])


def test_heal_prompt_backs_up_the_trailing_space():
    tok = _tok()
    ids = tok.encode("def ").ids
    healed, allowed, tail = heal_prompt(tok, ids)
    assert tail == " " and healed == ids[:-1]
    assert allowed and all(tok.decode([i]).startswith(" ") for i in allowed)
    assert any(tok.decode([i]) == " foo" or tok.decode([i]).startswith(" f") for i in allowed)
    assert heal_prompt(tok, tok.encode("d").ids[:1])[1] is None  # one token: nothing to back up over


def test_first_new_token_obeys_the_restriction():
    torch.manual_seed(0)
    tok = _tok()
    model = Transformer(ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                                    max_seq_len=32))
    ids = tok.encode("def ").ids
    healed, allowed, _ = heal_prompt(tok, ids)
    free = generate(model, [healed], 3, temperature=0.0)[0]
    forced = generate(model, [healed], 3, temperature=0.0, first_allowed=allowed)[0]
    assert forced[0] in allowed
    assert free[0] not in allowed or free == forced  # a random model rarely picks a space token unforced
    text = complete(model, tok, ids, 3, temperature=0.0)[0]
    assert text.startswith("def ") and not text.startswith("def  ")


def test_no_healing_where_the_last_token_holds_part_of_a_character():
    tok = _tok()
    ids = tok.encode("def fé").ids
    healed, allowed, _ = heal_prompt(tok, ids)
    if tok.decode(ids[-1:]) == "\ufffd" or tok.decode(ids[:-1]) + tok.decode(ids[-1:]) != "def fé":
        assert healed == ids and allowed is None
    text = complete(Transformer(ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                            d_ff=64, max_seq_len=32)), tok, ids, 2, temperature=0.0)[0]
    assert text.startswith("def fé")
