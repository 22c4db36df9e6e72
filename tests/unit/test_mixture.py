"""data.mixture: windows drawn from several prepared corpora by weight (sheepop.data.loader.MixtureWindows),
checked once by the driver (sheepop.data.mixture.load_sources). Built on two small corpora prepared
for real with one tokenizer (tests.helpers.corpora.mixture_sources); the training run:
tests/integration/test_mixture.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sheepop.config import compose
from sheepop.data.loader import MixtureWindows, TokenWindows
from sheepop.data.mixture import load_sources, tokens_seen
from sheepop.errors import UserError
from tests.helpers import DATA_DIR, one_error_line, sheepop
from tests.helpers.corpora import mixture_sources

SEQ = 128  # model=tiny's max_seq_len


@pytest.fixture(scope="module")
def corpora():
    return mixture_sources(DATA_DIR / "mixture")


def windows(dirs, weights, split="train"):
    return MixtureWindows([TokenWindows(d, json.loads((d / "manifest.json").read_text()), split, SEQ) for d in dirs],
                          weights)


def mix_cfg(*sources: str, extra: tuple = ()):
    return compose(["model=tiny", "data.mixture=[" + ", ".join(sources) + "]", *extra])


def test_ratio_within_2_percent_over_500_windows_and_each_window_from_its_source(corpora):
    mix = windows(corpora, [0.7, 0.3])
    shards = [s.shards[0].tobytes() for s in mix.sources]
    assert len(mix.sources[0].shards) == len(mix.sources[1].shards) == 1
    for seed in (0, 1337):
        rows = np.concatenate([mix.windows(seed, step, 10) for step in range(50)])  # 500 windows
        src = np.concatenate([mix.source_of(seed, step, 10) for step in range(50)])
        assert len(rows) == 500
        for row, k in zip(rows, src):  # the window really is text of the source it was drawn for
            needle = row.astype(mix.sources[k].shards[0].dtype).tobytes()
            assert shards[k].find(needle) >= 0 and shards[1 - k].find(needle) < 0
        assert abs((src == 0).mean() - 0.7) <= 0.02
    # Any 500 windows of a run, whatever the batch size: the mix follows the weights.
    for n, start in ((8, 0), (16, 300), (1, 10_000)):
        src = np.concatenate([mix.source_of(7, s, n) for s in range(start, start + -(-500 // n))])[:500]
        assert abs((src == 0).mean() - 0.7) <= 0.02, (n, start)


def test_windows_are_a_function_of_seed_and_step(corpora):
    a, b = windows(corpora, [0.7, 0.3]), windows(corpora, [7, 3])  # weights are normalized
    assert np.array_equal(a.windows(5, 12, 16), b.windows(5, 12, 16))
    assert not np.array_equal(a.windows(5, 12, 16), a.windows(5, 13, 16))
    assert not np.array_equal(a.windows(5, 12, 16), a.windows(6, 12, 16))
    zero = windows(corpora, [1.0, 0.0])  # a weight of 0: that source is never drawn
    assert (np.concatenate([zero.source_of(5, s, 16) for s in range(20)]) == 0).all()


def test_one_and_two_workers_see_the_same_global_batch(corpora):
    mix = windows(corpora, [0.7, 0.3])

    def global_batch(world: int, accum: int) -> torch.Tensor:
        parts = {}
        for rank in range(world):
            for m in range(accum):
                x, y = mix.micro_batch(3, 9, rank=rank, world=world, micro=4, accum=accum, index=m)
                assert torch.equal(x[:, 1:], y[:, :-1])
                parts[(m, rank)] = x
        return torch.cat([parts[k] for k in sorted(parts)])  # rows in (micro index, rank) order

    one, two = global_batch(1, 2), global_batch(2, 1)
    assert torch.equal(one, two)
    assert torch.equal(one, torch.from_numpy(mix.windows(3, 9, 8))[:, :-1])
    # The per-source counts the loop logs are the same whatever the world size: one global draw.
    assert mix.source_counts(3, 9, 8).tolist() == [int((mix.source_of(3, 9, 8) == k).sum()) for k in (0, 1)]


def test_a_plain_corpus_draws_the_windows_it_always_did(corpora):
    """data.mixture empty: TokenWindows is today's loader (the reference below is its old body)."""
    manifest = json.loads((corpora[0] / "manifest.json").read_text())
    tw = TokenWindows(corpora[0], manifest, "train", SEQ)
    rng = np.random.default_rng([1337, 4])
    shard = rng.choice(len(tw.shards), size=8, p=tw.weights)
    offset = rng.integers(0, tw.starts[shard])
    old = np.stack([tw.shards[s][o:o + SEQ + 1] for s, o in zip(shard, offset)]).astype(np.int64)
    assert np.array_equal(tw.windows(1337, 4, 8), old)


def test_tokens_seen_counts_the_windows_trained_on(corpora):
    mix = windows(corpora, [0.7, 0.3])
    seen = tokens_seen(mix, 1337, 20, [], 8, SEQ)
    assert sum(seen) == 20 * 8 * SEQ and abs(seen[0] / sum(seen) - 0.7) < 0.02
    # trainer.skip_steps=[3]: step 3's window is never used, step 20 trains on window 20 instead
    skipped = tokens_seen(mix, 1337, 20, [3], 8, SEQ)
    by_window = [mix.source_counts(1337, w, 8) * SEQ for w in range(21)]
    assert skipped == (sum(by_window) - by_window[2]).tolist()


def test_the_driver_loads_each_source_once(corpora):
    a, b = corpora
    sources = load_sources(mix_cfg(f"{{out_dir: {a}, weight: 7}}", f"{{out_dir: {b}, weight: 3, name: caps}}"))
    assert [(s.name, s.weight, s.out_dir) for s in sources] == [("prose", 0.7, str(a)), ("caps", 0.3, str(b))]
    assert sources[0].manifest == json.loads((a / "manifest.json").read_text())


def bad(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    line = str(e.value)
    assert "\n" not in line
    return line


def test_bad_mixtures_are_one_line_naming_the_value(corpora, tmp_path):
    a, b = corpora
    assert "data.mixture weights [0.0, 0.0] sum to 0.0: they must sum to a positive number" in bad(
        lambda: mix_cfg(f"{{out_dir: {a}, weight: 0}}", f"{{out_dir: {b}, weight: 0}}"))
    assert f"data.mixture[1].weight=-0.5 ({b}): weights must be finite and >= 0" in bad(
        lambda: mix_cfg(f"{{out_dir: {a}, weight: 1}}", f"{{out_dir: {b}, weight: -0.5}}"))
    assert "data.mixture[0].out_dir is empty" in bad(lambda: mix_cfg("{weight: 1}"))
    assert "data.mixture: unknown key 'wieght' in a source; valid keys: out_dir, weight, name" in bad(
        lambda: mix_cfg(f"{{out_dir: {a}, wieght: 1}}"))
    assert "two sources are named 'prose'" in bad(lambda: mix_cfg(f"{{out_dir: {a}}}", f"{{out_dir: {a}}}"))
    missing = tmp_path / "never-prepared"
    line = bad(lambda: load_sources(mix_cfg(f"{{out_dir: {a}}}", f"{{out_dir: {missing}}}")))
    assert f"data.mixture[1].out_dir={missing}: no prepared data there (no manifest.json)" in line
    assert f"`sheepop prepare data.out_dir={missing} ...`" in line


def test_a_tokenizer_mismatch_is_one_line(corpora, tmp_path):
    a, _ = corpora
    other = tmp_path / "other"  # the same kind of text, its own tokenizer
    other.mkdir()
    for name in ("manifest.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"):
        (other / name).write_bytes((a / name).read_bytes())
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256_16"] = "0123456789abcdef"
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = sheepop("train", "model=tiny", f"run.dir={tmp_path}/run", "cluster=process",
                f"data.mixture=[{{out_dir: {a}}}, {{out_dir: {other}, weight: 2}}]")
    line = one_error_line(r)
    assert line.startswith("sheepop train: error: tokenizer mismatch across mixture sources: other (") and \
        "has tokenizer 0123456789abcdef" in line and f"tokenizer.path={a}/tokenizer.json" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started


def test_prepare_with_a_mixture_is_refused_in_one_line(corpora, tmp_path):
    a, b = corpora
    line = one_error_line(sheepop("prepare", "model=tiny", f"data.mixture=[{{out_dir: {a}}}, {{out_dir: {b}}}]"))
    assert "data.mixture is set: `sheepop prepare` prepares one corpus; prepare each source on its own" in line


def test_per_source_metrics_have_w_and_b_names():
    from sheepop.train.metrics import wandb_key

    assert wandb_key("tokens/caps") == "data/tokens/caps" and wandb_key("val_loss/caps") == "val/loss/caps"
    assert wandb_key("val_loss") == "val/loss" and wandb_key("time") is None
