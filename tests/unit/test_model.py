"""The transformer: causality, shapes, parameter counts, the KV cache."""
import pytest
import torch

from sheepop.model.config import ModelConfig
from sheepop.model.generate import generate
from sheepop.model.transformer import KVCache, Transformer, chunked_cross_entropy, num_params


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{"init_std": 0.2, **kw})).eval()


def test_causality_future_tokens_do_not_change_past_logits():
    m = _model()
    x = torch.randint(0, 1024, (2, 32))
    for t in (0, 10, 30):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 7) % 1024
        a, b = m(x), m(x2)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # and later positions do see it


def test_param_count_matches_allocation_tied_and_untied():
    for tied in (True, False):
        args = ModelConfig(tie_embeddings=tied, n_kv_heads=1)
        m = Transformer(args)
        assert sum(p.numel() for p in m.parameters()) == num_params(args)


def test_published_llama_7b_parameter_count_without_allocating():
    args = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                     tie_embeddings=False)
    assert num_params(args) == 6_738_415_616


def test_loss_is_cross_entropy_of_logits():
    m = _model()
    x = torch.randint(0, 1024, (2, 16))
    y = torch.randint(0, 1024, (2, 16))
    ref = torch.nn.functional.cross_entropy(m(x).reshape(-1, 1024), y.reshape(-1))
    assert torch.allclose(m(x, y), ref)


def test_the_loss_in_chunks_equals_one_cross_entropy_in_value_and_gradients():
    """chunked_cross_entropy: the same mean (ignored targets excluded) and the same gradients as one
    fp32 cross_entropy over all of the batch's logits, for chunks that do and do not divide it."""
    m = _model()
    torch.manual_seed(1)
    h = torch.randn(3, 16, m.args.d_model, requires_grad=True)
    y = torch.randint(0, 1024, (3, 16))
    y[0, :5] = -100  # padding
    ref = torch.nn.functional.cross_entropy(m.head(h).float().reshape(-1, 1024), y.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [h, m.head.weight])
    for chunk in (7, 16, 48, None):  # None: the default size, one chunk here
        loss = chunked_cross_entropy(m.head, h, y, chunk_tokens=chunk)
        grads = torch.autograd.grad(loss, [h, m.head.weight])
        assert torch.allclose(loss, ref, atol=1e-6), chunk
        assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref_grads)), chunk


@pytest.mark.parametrize("max_len", [24, 40])  # buffers exactly full, and roomier than needed
def test_kv_cache_logits_equal_full_forward(max_len):
    m = _model()
    x = torch.randint(0, 1024, (1, 24))
    full = m(x)
    cache = KVCache(m.args.n_layers, max_len=max_len)
    parts = [m(x[:, :10], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(10, 24)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-4  # float noise of a different op order
    assert cache.length == 24
    if max_len == 24:
        with pytest.raises(ValueError, match="full"):
            m(x[:, :1], cache=cache)


def test_generation_cached_equals_uncached_and_batched_equals_single():
    m = _model()
    prompts = [[5, 9, 100, 3, 7, 2], [44, 8], [1, 2, 3]]
    cached = generate(m, prompts, 12, use_cache=True)
    assert cached == generate(m, prompts, 12, use_cache=False)
    assert cached == [generate(m, [p], 12)[0] for p in prompts]
    assert len({tuple(c) for c in cached}) > 1 and len(set(cached[0])) > 1  # non-trivial output


def test_model_config_from_a_saved_dict_ignores_unknown_keys():
    saved = {"name": "tiny", "d_model": 64, "n_heads": 4, "some_key_of_another_version": 1}
    cfg = ModelConfig.from_dict(saved)
    assert cfg == ModelConfig(name="tiny", d_model=64, n_heads=4) and cfg.head_dim == 16
