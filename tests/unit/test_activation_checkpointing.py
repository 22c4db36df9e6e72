"""Activation checkpointing (sheepop.train.activation_checkpointing): the same loss and gradients,
the same state-dict keys, fewer saved bytes, untouched eval and generation, one-line bad config.
A real DeepSpeed engine training with it: tests/integration/test_train.py."""
from __future__ import annotations

import pytest
import torch

from sheepop.config import compose
from sheepop.errors import UserError
from sheepop.model.config import ModelConfig, checkpointed_layers
from sheepop.model.generate import generate
from sheepop.model.transformer import KVCache, Transformer
from sheepop.train import activation_checkpointing
from tests.helpers import saved_bytes

ARGS = ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=64)
MODES = [("none", 2), ("full", 2), ("selective", 2), ("selective", 3)]


def _model(mode: str, every: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    activation_checkpointing.apply(model, mode, every)
    return model.train()


def _loss_and_grads(mode: str, every: int):
    model = _model(mode, every)
    torch.manual_seed(1)
    idx = torch.randint(0, ARGS.vocab_size, (2, 64))
    loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_selected_blocks():
    assert list(checkpointed_layers(5, "none", 2)) == []
    assert list(checkpointed_layers(5, "full", 2)) == [0, 1, 2, 3, 4]
    assert list(checkpointed_layers(5, "selective", 2)) == [0, 2, 4]
    assert list(checkpointed_layers(5, "selective", 3)) == [0, 3]


def test_loss_and_every_gradient_are_unchanged():
    loss0, grads0 = _loss_and_grads("none", 2)
    for mode, every in MODES[1:]:
        loss, grads = _loss_and_grads(mode, every)
        assert abs(loss - loss0) < 1e-5, (mode, every)
        assert grads.keys() == grads0.keys()
        for name, g in grads.items():
            assert (g - grads0[name]).abs().max().item() < 1e-5, (mode, every, name)


def test_state_dict_keys_are_unchanged():
    keys = list(_model("none", 2).state_dict())
    for mode, every in MODES[1:]:
        assert list(_model(mode, every).state_dict()) == keys


def test_full_mode_saves_fewer_bytes_for_backward():
    idx = torch.randint(0, ARGS.vocab_size, (2, 64))
    none = saved_bytes(_model("none", 2), idx, "fp32")
    selective = saved_bytes(_model("selective", 2), idx, "fp32")
    full = saved_bytes(_model("full", 2), idx, "fp32")
    assert full < selective < none, (full, selective, none)
    assert full < 0.5 * none


def test_eval_no_grad_and_kv_cache_forwards_do_not_checkpoint(monkeypatch):
    """Only a training forward with grad and no KV cache checkpoints (a recompute would write the
    cache twice); generation gives the plain model's tokens."""
    plain, ckpt = _model("none", 2), _model("full", 2)
    prompts = [[5, 6, 7], [8, 9]]
    assert generate(ckpt, prompts, 8) == generate(plain, prompts, 8)

    calls = []
    real = activation_checkpointing.checkpoint
    monkeypatch.setattr(activation_checkpointing, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    idx = torch.randint(0, ARGS.vocab_size, (1, 6))
    ckpt.eval()(idx)
    with torch.no_grad():
        ckpt.train()(idx)
    logits = ckpt.train()(idx, cache=KVCache(ARGS.n_layers, max_len=8))
    assert torch.equal(logits, plain.train()(idx, cache=KVCache(ARGS.n_layers, max_len=8)))
    assert calls == []
    ckpt.train()(idx)  # and a training forward does
    assert len(calls) == ARGS.n_layers


def test_bad_mode_is_one_user_error():
    with pytest.raises(UserError, match="model.activation_checkpointing=bogus; valid: none, full, selective$"):
        compose(["model.activation_checkpointing=bogus"])
    with pytest.raises(UserError, match="model.activation_checkpointing_every=0 must be >= 1"):
        compose(["model.activation_checkpointing=selective", "model.activation_checkpointing_every=0"])
    assert compose(["model.activation_checkpointing=full"]).model.activation_checkpointing == "full"
