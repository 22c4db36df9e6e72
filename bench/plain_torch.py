"""What the benches share: the training step a person writes by hand in plain PyTorch (forward
under autocast, backward, clip, AdamW with the same groups, LR schedule), and the random token
windows they feed it.

For precision=bf16 (DeepSpeed's bf16 mode in sheepop) the hand-written equivalent is bf16
autocast over fp32 weights: the usual PyTorch way to get bf16 matmuls."""
from __future__ import annotations

import torch

from sheepop.config import Config
from sheepop.train.engine import compute_dtype, lr_lambda, param_groups


def make_step(model: torch.nn.Module, cfg: Config, fused: bool = False):
    """step(window) → loss, for windows of shape (batch, seq + 1). `model` may be wrapped in DDP.
    fused: torch's fused AdamW (what sheepop uses, trainer.fused_optimizer) instead of its default."""
    t = cfg.trainer
    inner = getattr(model, "module", model)
    opt = torch.optim.AdamW(param_groups(inner, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    amp = compute_dtype(t.precision)

    def step(w: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        if t.grad_clip:  # 0 = off, as in the engine
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss.detach()

    return step


def windows(cfg: Config, n: int, micro: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    """n random token windows of shape (micro, seq + 1) over the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), generator=g) for _ in range(n)]
