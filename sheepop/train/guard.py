"""Divergence guard: a run whose loss or gradients blow up stops instead of passing for a finished one.

The loop feeds it every step's (all-reduced, so identical on every rank) loss and gradient norm.
A run has diverged when
  - the loss or the gradient norm is not finite (NaN, inf): at once;
  - the loss sits at ln(vocab) — the model predicts the uniform distribution, its weights
    collapsed — for `patience` steps after it had been well below that;
  - the loss stays far above where training started for `patience` steps.
While any of these is under way the model is suspect, and the loop takes no checkpoint, so a
collapsed model never displaces the last good checkpoint in the rotation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

UNIFORM_TOLERANCE = 0.01  # nats: "at ln(vocab)"
LEARNED_MARGIN = 0.3  # nats below ln(vocab) that show the model had learned something
BLOWUP_MARGIN = 1.0  # nats above the first loss that count as diverging


@dataclass
class DivergenceGuard:
    vocab_size: int
    patience: int = 5  # consecutive steps a collapse or blow-up must last
    first_loss: float | None = None
    best_loss: float = math.inf
    _run: int = field(default=0, repr=False)  # consecutive suspect steps

    @property
    def uniform_loss(self) -> float:
        return math.log(self.vocab_size)

    def _suspect_loss(self, loss: float) -> str | None:
        if self.best_loss < self.uniform_loss - LEARNED_MARGIN and abs(loss - self.uniform_loss) < UNIFORM_TOLERANCE:
            return f"the loss sits at ln(vocab) = {self.uniform_loss:.3f} (the model collapsed to uniform predictions)"
        ceiling = max(self.first_loss if self.first_loss is not None else loss, self.uniform_loss) + BLOWUP_MARGIN
        if loss > ceiling:
            return f"the loss ({loss:.4g}) stays above {ceiling:.3f}, where training started"
        return None

    def check(self, loss: float, grad_norm: float | None) -> str | None:
        """Feed one step; returns why the run diverged (stop it), or None."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        if self.first_loss is None:
            self.first_loss = loss
        why = self._suspect_loss(loss)
        self.best_loss = min(self.best_loss, loss)
        self._run = self._run + 1 if why else 0
        return f"{why} for {self._run} steps" if why and self._run >= self.patience else None

    @property
    def suspect(self) -> bool:
        """The last step looked like divergence: a checkpoint now could hold a broken model."""
        return self._run > 0
