"""Activation checkpointing: chosen transformer blocks keep only their input for backward and
run their forward again during backward (one more forward's compute for most of the activations).

Applied by the engine (torchtitan style): the model knows nothing of it. Each chosen Block gets an
instance `forward` that runs the class's own forward under torch's non-reentrant checkpoint, so
the module tree, and with it every state-dict key, stays as it was (checkpoint_wrapper would add
`_checkpoint_wrapped_module.` to each key), and DeepSpeed's per-module hooks (ZeRO-3 gathers)
still see the same submodules, in the recompute too.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from sheepop.model.config import checkpointed_layers


def _forward(block: torch.nn.Module, x, cos, sin, cache=None, mask=None):
    inner = type(block).forward
    # Only a training forward that builds a graph gains anything; eval and generation run as they
    # are, and a KV cache must never be written twice by a recompute.
    if cache is None and block.training and torch.is_grad_enabled():
        return checkpoint(inner, block, x, cos, sin, None, mask, use_reentrant=False)
    return inner(block, x, cos, sin, cache, mask)


def apply(model: torch.nn.Module, mode: str, every: int) -> None:
    """Checkpoint the blocks `checkpointed_layers` names of a sheepop Transformer, in place."""
    for i in checkpointed_layers(len(model.layers), mode, every):
        block = model.layers[i]
        # A partial of a module-level function (not a closure): copies and pickles of the model
        # call their own block.
        block.forward = functools.partial(_forward, block)
