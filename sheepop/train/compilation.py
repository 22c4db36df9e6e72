"""trainer.compile: torch.compile of each transformer block's training forward.

Applied by the engine, like activation checkpointing (sheepop.train.activation_checkpointing): the
model knows nothing of it. Each Block gets an instance `forward` whose training call (grad on,
module in training mode, no KV cache) runs a torch.compile'd copy of the forward it had, the
activation-checkpointed one included; evaluation and generation run eagerly.

Why per block, and why the block's forward rather than DeepSpeed 0.19's engine.compile() (which is
nn.Module.compile() of the whole model; DeepCompile, its other path, is a separate opt-in of the
DeepSpeed config):
- The module tree, parameter names and every state-dict key stay as they are (no `_orig_mod.`),
  so checkpoints, resume, export and generate see the model they always saw.
- The blocks share their code and, with parameters as graph inputs (torch 2.13 inlines modules),
  one compiled graph serves every layer: compile time does not grow with depth (torchtitan's choice).
- ZeRO-3 gathers and releases parameters in hooks on every submodule; they are
  torch.compiler.disable'd, so a compiled region that contains them breaks into pieces at every
  Linear, and dynamo then recompiles per submodule until it hits its recompile limit (seen here
  with block.compile(), hooks included: recompile-limit warnings on screen, blocks left mostly
  eager). At ZeRO-3 each Block is made a DeepSpeed "leaf"
  module instead: its parameters are gathered by the Block's own hooks, which run outside the
  compiled forward, and nothing inside it has a hook. (This also gathers a block's weights at
  once, FSDP-style, rather than Linear by Linear.)
- Training forwards only: an eval pass under no_grad would be a second full compile for a few
  batches, and generation's KV cache (growing shapes) would recompile on every length.
"""
from __future__ import annotations

import functools

import torch


def enabled(setting: str) -> bool:
    """What trainer.compile means on this machine: auto = on with CUDA, off on CPU (measured:
    on a 2-core CPU the compile cost did not pay back within a demo run; see README)."""
    v = str(setting).lower()
    return torch.cuda.is_available() if v == "auto" else v == "true"


def _forward(block: torch.nn.Module, eager, compiled, x, cos, sin, cache=None, mask=None):
    if cache is None and block.training and torch.is_grad_enabled():
        return compiled(x, cos, sin, None, mask)
    return eager(x, cos, sin, cache, mask)


def mark_zero3_leaves(model: torch.nn.Module) -> None:
    """Before deepspeed.initialize at ZeRO-3: hooks on each Block, none inside it (see above)."""
    from deepspeed.utils import set_z3_leaf_module

    for block in model.layers:
        set_z3_leaf_module(block, True)


def apply(model: torch.nn.Module, mode: str = "default") -> None:
    """Compile the training forward of every block of a sheepop Transformer, in place."""
    for block in model.layers:
        eager = block.forward  # the class's forward, or activation checkpointing's instance forward
        compiled = torch.compile(eager, mode=mode)
        # A partial of a module-level function (not a closure), as activation checkpointing does.
        block.forward = functools.partial(_forward, block, eager, compiled)
