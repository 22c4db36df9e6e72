"""Generation: the KV cache is real (one position per new token) and picks the same greedy
tokens as re-running the sequence; batching with left padding changes nothing; long prompts
are truncated with a warning; prompts the tokenizer cannot encode are refused."""
from __future__ import annotations

import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from sheepop.errors import UserError
from sheepop.model import ModelArgs, Transformer
from sheepop.model.generate import encode_prompt, generate
from tests.conftest import sheepop, tiny_overrides


@pytest.fixture(scope="module")
def model():
    """A random tiny model with a large init so greedy tokens vary (a trivial model would
    repeat one token and hide any disagreement between the paths)."""
    torch.manual_seed(0)
    return Transformer(ModelArgs(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160,
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
    """A BPE without byte fallback (as a user's tokenizer.path might be): ASCII letters only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def foo bar baz qux"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>"], show_progress=False))
    return tok


def test_prompt_with_characters_outside_the_vocabulary_is_refused(char_tokenizer):
    with pytest.raises(UserError, match=r"outside the tokenizer's vocabulary: 'é' \(U\+00E9\)"):
        encode_prompt(char_tokenizer, "def fé", 512)
    assert encode_prompt(char_tokenizer, "def foo", 512)  # letters it knows pass


def test_byte_level_tokenizer_encodes_anything():
    from sheepop.data.tokenizer import train_bpe

    tok = train_bpe(["def f(x):\n    return x\n"] * 20, 300, ["<|endoftext|>", "<|pad|>"])
    ids = encode_prompt(tok, "héllo 🐑 <|endoftext|>", 300)
    assert tok.decode(ids, skip_special_tokens=False) == "héllo 🐑 <|endoftext|>"
    with pytest.raises(UserError, match="outside the model's vocabulary of 100"):
        encode_prompt(tok, "héllo", 100)


@pytest.mark.slow
def test_cli_refuses_a_prompt_outside_the_vocabulary(tmp_path, char_tokenizer):
    """A real run whose checkpoint carries a tokenizer without byte fallback: one error line; so do
    bad sampling options and an export path that cannot be written."""
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=4", "trainer.eval_every=0"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = next((run / "checkpoints").iterdir())
    shutil.copy(ckpt / "tokenizer.json", tmp_path / "orig.json")
    char_tokenizer.save(str(ckpt / "tokenizer.json"))
    r = sheepop("generate", f"run.dir={run}", "prompt=def fé", "max_new_tokens=5")
    assert r.returncode == 2
    assert "prompt has characters outside the tokenizer's vocabulary: 'é'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # Bad sampling options and an unwritable export path: one line each, the value named.
    for args, message in ((["temperature=-1"], "temperature=-1.0: must be >= 0"), (["top_p=1.5"], "top_p=1.5: must be in"),
                          (["num_samples=0"], "num_samples=0: must be >= 1")):
        r = sheepop("generate", f"run.dir={run}", *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "a_file").write_text("")
    r = sheepop("export-weights", f"run.dir={run}", f"out={tmp_path}/a_file/model.pt")
    assert r.returncode == 2 and "cannot write there" in r.stderr and "Traceback" not in r.stderr, r.stderr
    shutil.copy(tmp_path / "orig.json", ckpt / "tokenizer.json")  # the byte-level one takes anything
    r = sheepop("generate", f"run.dir={run}", "prompt=def fé", "max_new_tokens=5", "greedy=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("def fé")
