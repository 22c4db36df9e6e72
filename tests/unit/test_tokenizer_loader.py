"""Tokenizer round trips and the deterministic window loader."""
import numpy as np
import torch

from sheepop.data.loader import TokenWindows
from sheepop.data.shards import load_manifest, prepare
from sheepop.data.tokenizer import EOT, load, train_bpe

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld — ünïcödé 你好 🐑\n", "class A:\n    pass\n"] * 50


def test_bpe_round_trips_arbitrary_utf8_and_special_tokens_are_distinct():
    tok = train_bpe(TEXTS, 400, [EOT, "<|pad|>"])
    rng = np.random.default_rng(0)
    samples = TEXTS + ["".join(chr(c) for c in rng.integers(1, 0x2FFFF, 200) if not 0xD800 <= c < 0xE000)
                       for _ in range(20)] + ["\x00\t\r\n  ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    for s in samples:
        assert tok.decode(tok.encode(s).ids) == s
    eot, pad = tok.token_to_id(EOT), tok.token_to_id("<|pad|>")
    byte_ids = {tok.token_to_id(c) for c in __import__("tokenizers").pre_tokenizers.ByteLevel.alphabet()}
    assert eot not in byte_ids and pad not in byte_ids and eot != pad and len(byte_ids) == 256
    assert tok.encode("<|endoftext|>").ids == [eot]  # never split into bytes


def test_prepare_writes_manifest_and_reuses_it(tiny_cfg):
    out = tiny_cfg.data.out_dir
    m = load_manifest(out)
    assert m["tokenizer"]["vocab_size"] == 1024 and m["dtype"] == "uint16"
    assert m["splits"]["train"]["docs"] > 0 and m["splits"]["val"]["docs"] > 0
    assert m["tokens"] == m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    mtime = (__import__("pathlib").Path(out) / "manifest.json").stat().st_mtime_ns
    assert prepare(tiny_cfg, log=lambda *_: None)["fingerprint"] == m["fingerprint"]
    assert (__import__("pathlib").Path(out) / "manifest.json").stat().st_mtime_ns == mtime  # untouched
    tok = load(f"{out}/tokenizer.json")
    shard = np.fromfile(f"{out}/{m['splits']['train']['shards'][0]['file']}", dtype=np.uint16)
    assert (shard == m["tokenizer"]["eot_id"]).sum() == m["splits"]["train"]["docs"]  # one EOT per document
    assert "def " in tok.decode(shard[:2000].tolist())


def test_windows_are_deterministic_rank_disjoint_and_world_size_invariant(tiny_cfg):
    out = tiny_cfg.data.out_dir
    w = TokenWindows(out, load_manifest(out), "train", 64)
    a = w.micro_batch(1, 5, rank=0, world=2, micro=4, accum=1, index=0)
    assert torch.equal(a[0], w.micro_batch(1, 5, rank=0, world=2, micro=4, accum=1, index=0)[0])
    b = w.micro_batch(1, 5, rank=1, world=2, micro=4, accum=1, index=0)
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted by one
    # 1 worker × 2 accumulation steps sees exactly the global batch of 2 workers × 1 step.
    one = [w.micro_batch(1, 5, rank=0, world=1, micro=4, accum=2, index=i)[0] for i in range(2)]
    assert torch.equal(torch.cat(one), torch.cat([a[0], b[0]]))
    assert not torch.equal(a[0], w.micro_batch(1, 6, rank=0, world=2, micro=4, accum=1, index=0)[0])
