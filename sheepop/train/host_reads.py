"""What the training loop reads back from the device, and when: only on steps that need it.

Reading a device value on the host (`.item()`, `.tolist()`, `float()`) makes the host wait until
the device has finished everything queued before it. Doing that every step leaves a GPU idle
while the host queues the next step's kernels. So, as in nanoGPT and torchtitan:

  - `StepValues` keeps each step's loss and gradient norm on the device. A step that logs
    (trainer.log_every, an evaluation, a save, the last step) reads every step since the last
    read in one copy, and the spike detector and divergence guard then see each of them in order.
  - `LaggedFlags` carries the stop and save requests, all-reduced every step (all ranks must
    agree), to the host one step late: the copy was queued a whole step ago, so on a GPU it has
    landed and reading it does not stall. A stop or save is taken one step after it was asked.

On a CPU nothing is asynchronous and these are plain reads; the logic is the same on both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class StepValue:
    step: int  # the optimizer step this is (1-based, as logged)
    window: int  # the data window it trained on (sheepop.data.loader.data_step)
    lr: float  # the rate it used
    loss: float  # mean over ranks
    grad_norm: float | None  # global, after the step (None: DeepSpeed did not compute one)
    attended: float | None  # data.document_mask: the step's attention span, for MFU


class StepValues:
    """The steps since the last host read, their loss and grad norm still on the device."""

    def __init__(self):
        self._rows: list[tuple[int, int, float, torch.Tensor, object, float | None]] = []

    def add(self, step: int, window: int, lr: float, loss: torch.Tensor, grad_norm, attended: float | None) -> None:
        """loss: a 0-d device tensor; grad_norm: DeepSpeed's (a 0-d tensor, a float, or None)."""
        if torch.is_tensor(grad_norm):  # copies (on the device): the buffers they came from get reused
            grad_norm = grad_norm.detach().reshape(()).clone()
        self._rows.append((step, window, lr, loss.detach().reshape(()).clone(), grad_norm, attended))

    def __len__(self) -> int:
        return len(self._rows)

    def read(self) -> list[StepValue]:
        """Every step added since the last read, with host values, oldest first (one device read)."""
        rows, self._rows = self._rows, []
        if not rows:
            return []
        tensors = [r[3].float() for r in rows] + [r[4].float() for r in rows if torch.is_tensor(r[4])]
        values = torch.stack(tensors).tolist()  # the one host sync
        losses, norms = values[:len(rows)], iter(values[len(rows):])
        return [StepValue(step=s, window=w, lr=lr, loss=loss,
                          grad_norm=next(norms) if torch.is_tensor(g) else (None if g is None else float(g)),
                          attended=a)
                for (s, w, lr, _, g, a), loss in zip(rows, losses)]


class LaggedFlags:
    """Flags all-reduced on one step, read on the next without waiting for the device."""

    def __init__(self):
        self._pending: tuple[torch.Tensor, object, torch.cuda.Event | None] | None = None

    def push(self, flags: torch.Tensor, context=None) -> None:
        """flags: a small device tensor (this step's all-reduced requests); context: what to hand
        back with them (the requests' reasons)."""
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, context, event)
        else:
            self._pending = (flags.detach().clone(), context, None)

    def pop(self) -> tuple[list[float], object] | None:
        """The flags pushed last (and their context), or None; each push is read once."""
        if self._pending is None:
            return None
        host, context, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # queued a step ago: done by now
        return host.tolist(), context
