"""Generation: the KV cache is real (one position per new token) and picks the same greedy
tokens as re-running the sequence; batching with left padding changes nothing; long prompts
are truncated with a warning; prompts the tokenizer cannot encode are refused (PromptError).
The same through the CLI on a trained run: tests/integration/test_generate.py."""
from __future__ import annotations

import pytest
import torch

from sheepop.model.config import ModelConfig
from sheepop.model.generate import PromptError, encode_prompt, generate
from sheepop.model.transformer import Transformer
from tests.helpers import letters_only_tokenizer


@pytest.fixture(scope="module")
def model():
    """A random tiny model with a large init so greedy tokens vary (a trivial model would
    repeat one token and hide any disagreement between the paths)."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160,
                                 max_seq_len=96, init_std=0.4)).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 12], [13, 14, 15, 16, 400]]


def test_cached_and_uncached_pick_the_same_greedy_tokens(model):
    cached = generate(model, PROMPTS, 40, use_cache=True)
    uncached = generate(model, PROMPTS, 40, use_cache=False)
    assert cached == uncached
    assert all(len(set(o)) > 10 for o in cached)  # non-trivial output


def test_batched_left_padded_equals_one_by_one(model):
    for use_cache in (True, False):
        batched = generate(model, PROMPTS, 30, use_cache=use_cache)
        alone = [generate(model, [p], 30, use_cache=use_cache)[0] for p in PROMPTS]
        assert batched == alone


def test_sampling_is_reproducible_with_a_seed_and_same_with_or_without_cache(model):
    a = generate(model, PROMPTS, 20, temperature=1.0, top_k=50, seed=3)
    b = generate(model, PROMPTS, 20, temperature=1.0, top_k=50, seed=3, use_cache=False)
    assert a == b


def test_each_new_token_costs_one_position(model):
    """Count the positions every forward call processes: with the cache, the prompt once and
    then exactly one per new token; without it, the whole sequence every step."""
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    try:
        generate(model, [PROMPTS[0]], 20, use_cache=True)
        cached = list(seen)
        seen.clear()
        generate(model, [PROMPTS[0]], 20, use_cache=False)
        uncached = list(seen)
    finally:
        hook.remove()
    p = len(PROMPTS[0])
    assert cached == [p] + [1] * 19
    assert uncached == [p + i for i in range(20)]


def test_long_prompt_is_truncated_with_a_warning(model):
    long = list(range(1, 200))  # context is 96
    with pytest.warns(UserWarning, match="keeping its last 86"):
        out = generate(model, [long], 10)
    assert out == generate(model, [long[-86:]], 10)


@pytest.fixture(scope="module")
def char_tokenizer():
    return letters_only_tokenizer()


def test_prompt_with_characters_outside_the_vocabulary_is_refused(char_tokenizer):
    with pytest.raises(PromptError, match=r"outside the tokenizer's vocabulary: 'é' \(U\+00E9\)"):
        encode_prompt(char_tokenizer, "def fé", 512)
    assert encode_prompt(char_tokenizer, "def foo", 512)  # letters it knows pass


def test_byte_level_tokenizer_encodes_anything():
    from sheepop.data.tokenizer import train_bpe

    tok = train_bpe(["def f(x):\n    return x\n"] * 20, 300, ["<|endoftext|>", "<|pad|>"])
    ids = encode_prompt(tok, "héllo 🐑 <|endoftext|>", 300)
    assert tok.decode(ids, skip_special_tokens=False) == "héllo 🐑 <|endoftext|>"
    with pytest.raises(PromptError, match="outside the model's vocabulary of 100"):
        encode_prompt(tok, "héllo", 100)
    with pytest.raises(PromptError, match="prompt is empty"):
        encode_prompt(tok, "", 300)
    assert issubclass(PromptError, ValueError)
