"""Loss-spike detector: a step whose loss (or gradient norm) jumps far above its recent history.

A spike is a single bad step. Divergence is different: the run has gone wrong for good, and
sheepop.train.guard handles that. The training loop uses a spike to skip or roll back one step
before the bad update spreads through the weights, so this detector has to be cheap, identical
on every rank (it only sees the all-reduced loss and the global grad norm) and hard to fool:

  - Robust statistics. The median and the MAD (median absolute deviation) of the last `window`
    good steps barely move when an outlier comes in, where a mean and a standard deviation would
    follow the spike and hide the next one. The robust z-score is
    (x - median) / (1.4826 * MAD); 1.4826 makes the MAD match the standard deviation of normal
    noise.
  - Only good steps go into the history, so a run of spikes is still measured against the curve
    from before it, and every one of them is reported.
  - A relative floor (`min_rel_jump`): on a nearly flat curve the MAD gets tiny and the z-score
    of plain noise huge, so the loss must also be a real fraction above the median.
  - Nothing is called before `min_history` good steps: early training moves too fast for a
    window's statistics to mean anything. A non-finite loss or grad norm is always a spike.

The history is plain floats (`state_dict`), small enough for a checkpoint's meta.json.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAD_TO_SD = 1.4826  # MAD of normal noise × this = its standard deviation
REL_SCALE_FLOOR = 1e-3  # the scale never drops below this fraction of |median| (flat history)
ABS_SCALE_FLOOR = 1e-8  # ... nor below this (a median of 0)


def robust_z(x: float, history: list[float]) -> tuple[float, float]:
    """(robust z-score of x against history, history's median); history must not be empty."""
    median = statistics.median(history)
    mad = statistics.median([abs(h - median) for h in history])
    scale = max(MAD_TO_SD * mad, REL_SCALE_FLOOR * abs(median), ABS_SCALE_FLOOR)
    return (x - median) / scale, median


@dataclass
class SpikeDetector:
    window: int = 50  # recent good steps the statistics use
    min_history: int = 10  # good steps seen before any spike can be called (early training moves fast)
    z_threshold: float = 6.0  # robust z-score of the loss above the window's median that counts as a spike
    grad_z_threshold: float = 0.0  # same for the gradient norm; 0 = loss only
    min_rel_jump: float = 0.05  # the value must also exceed the median by this fraction (a flat curve's tiny MAD must not make noise a spike)
    _losses: deque[float] = field(default_factory=deque, init=False, repr=False)  # the last `window` good steps' losses
    _grad_norms: deque[float] = field(default_factory=deque, init=False, repr=False)  # ... and their grad norms (where given)

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window >= 3):
            raise ValueError(f"spike detector: window={self.window!r}, must be an integer >= 3")
        if not (isinstance(self.min_history, int) and 3 <= self.min_history <= self.window):
            raise ValueError(f"spike detector: min_history={self.min_history!r}, must be an integer "
                             f"in [3, window={self.window}]")
        if not self.z_threshold > 0 or math.isinf(self.z_threshold):
            raise ValueError(f"spike detector: z_threshold={self.z_threshold!r}, must be a finite number > 0")
        if not self.grad_z_threshold >= 0 or math.isinf(self.grad_z_threshold):
            raise ValueError(f"spike detector: grad_z_threshold={self.grad_z_threshold!r}, must be a finite "
                             f"number >= 0 (0 = loss only)")
        if not self.min_rel_jump >= 0 or math.isinf(self.min_rel_jump):
            raise ValueError(f"spike detector: min_rel_jump={self.min_rel_jump!r}, must be a finite number >= 0")
        self._losses = deque(maxlen=self.window)
        self._grad_norms = deque(maxlen=self.window)

    def _spike(self, name: str, x: float, history: deque[float], threshold: float) -> str | None:
        if len(history) < self.min_history:
            return None
        z, median = robust_z(x, list(history))
        if z > threshold and x > median + self.min_rel_jump * abs(median):
            return (f"{name} {x:.4g} is {z:.1f} robust SDs above the median {median:.4g} "
                    f"of the last {len(history)} steps")
        return None

    def check(self, loss: float, grad_norm: float | None) -> str | None:
        """Feed one step. Returns a one-line reason when this step is a spike, else None.

        A non-finite loss or grad norm is a spike at once (the extreme case), even before
        min_history. A spike is not added to the history (so a run of spikes stays visible);
        good steps are."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"grad norm is {grad_norm}"
        why = self._spike("loss", loss, self._losses, self.z_threshold)
        if why is None and self.grad_z_threshold > 0 and grad_norm is not None:
            why = self._spike("grad norm", grad_norm, self._grad_norms, self.grad_z_threshold)
        if why is None:
            self._losses.append(float(loss))
            if grad_norm is not None:
                self._grad_norms.append(float(grad_norm))
        return why

    def state_dict(self) -> dict[str, Any]:
        """The history as plain lists of floats (JSON-able, for a checkpoint's meta.json)."""
        return {"losses": list(self._losses), "grad_norms": list(self._grad_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() history; only the last `window` values are kept if it is longer."""
        self._losses = deque((float(x) for x in state.get("losses", [])), maxlen=self.window)
        self._grad_norms = deque((float(x) for x in state.get("grad_norms", [])), maxlen=self.window)
