"""What the loop can still change about a step's update after its gradients exist.

DeepSpeed applies the update inside `engine.step()` and wraps the optimizer differently at each
ZeRO stage (ZeRO-1/2's and ZeRO-3's partitioned optimizers, the bf16 optimizer, none in fp32 at
stage 0). Every wrapper ends by calling the step() of the *client* optimizer that sheepop passed
in, on the fp32 master weights, and then the client LR scheduler's step(). So the loop's controls
live in those two client objects and work the same at every stage:

  - `gate.skip`: the next `engine.step()` changes nothing. The optimizer leaves the master weights
    and its moments as they are (the ZeRO wrapper then copies the unchanged master back into the
    model), and the schedule does not move. trainer.on_spike=skip uses it: the step is as if its
    data had never been drawn, exactly like trainer.skip_steps.
  - `gate.lr_scale` for schedule steps below `gate.lr_scale_until`: a lowered rate for a while after
    a rollback (trainer.rollback_lr_scale, trainer.rollback_lr_steps).

Offloaded optimizer state is stepped by DeepSpeed's own CPU Adam, which has no gate; config
validation refuses on_spike=skip with parallelism.offload_optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class UpdateGate:
    skip: bool = False  # the next optimizer step applies no update and the schedule stays put
    lr_scale: float = 1.0  # multiplies the scheduled rate ...
    lr_scale_until: int = 0  # ... for schedule steps (0-based optimizer steps) below this

    def factor(self, step: int) -> float:
        return self.lr_scale if step < self.lr_scale_until else 1.0


class GatedAdamW(torch.optim.AdamW):
    """torch's AdamW, whose step() is a no-op while gate.skip is set (ZeRO-3 calls it once per
    sub-group of parameters; every call of a skipped step is skipped)."""

    def __init__(self, params, gate: UpdateGate, **kwargs):
        super().__init__(params, **kwargs)
        self.gate = gate

    @torch.no_grad()
    def step(self, closure=None):
        if self.gate.skip:
            return None
        return super().step(closure)


class GatedLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose schedule stands still on a skipped step and is scaled by the gate."""

    def __init__(self, optimizer, lr_lambda: Callable[[int], float], gate: UpdateGate):
        self.gate = gate  # before super().__init__, which takes the first step
        super().__init__(optimizer, lambda s: lr_lambda(s) * gate.factor(s))

    def step(self, epoch=None):
        if self.gate.skip:
            return
        super().step(epoch)

    def state_dict(self) -> dict:
        # LambdaLR saves every attribute but the optimizer; the gate is the loop's, not checkpoint state
        return {k: v for k, v in super().state_dict().items() if k != "gate"}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "gate"})

    def refresh(self) -> None:
        """Apply a changed gate.lr_scale to the rate of the current step at once (not only from the
        next schedule step): what a rollback needs, since loading a checkpoint restores the rates
        it saved."""
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
