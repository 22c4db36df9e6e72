"""`sheepop plan [hydra overrides]`: parameters, FLOPs, memory per GPU and time of a run, without
starting anything (the model of what it costs is sheepop.plan)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sheepop.cli.args import wants_help
from sheepop.errors import UserError

if TYPE_CHECKING:
    from sheepop.config import Config

# Spellings `sheepop plan` accepts besides the config's own keys.
SHORT = {"mfu": "cluster.mfu"}


def usage() -> str:
    from sheepop.plan import plannable

    return ("usage: sheepop plan [hydra overrides]   (cluster.mfu=0.4, or mfu=0.4: the MFU of the time estimate)\n"
            "  e.g. sheepop plan model=llama-7b cluster.gpu=a100-80gb cluster.num_workers=8 parallelism=zero3\n"
            f"  GPU types (cluster.gpu): {', '.join(plannable())}")


def expand_short(overrides: list[str]) -> list[str]:
    """`mfu=0.35` → `cluster.mfu=0.35` (validated, like any key, by sheepop.config)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        out.append(f"{SHORT[key]}={value}" if eq and key in SHORT else o)
    return out


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(usage())
        return 0
    from sheepop.plan import gpu_spec, render, summary

    cfg, note = compose_for_plan(expand_short(argv))
    gpu_spec(cfg.cluster.gpu)  # an unknown GPU type: one line before any arithmetic
    print(render(summary(cfg), cfg) + (f"\nnote: {note}" if note else ""))
    return 0


def compose_for_plan(overrides: list[str]) -> tuple[Config, str]:
    """The composed config; when the global batch does not split into micro batches on this many
    GPUs (the presets' global batch of 16 on 8 GPUs), plan it with the largest micro batch that
    keeps the global batch, and say so, rather than refuse."""
    from sheepop.config import compose

    try:
        return compose(overrides), ""
    except UserError as e:
        if not str(e).startswith("trainer.global_batch_size="):
            raise
        glob = compose([*overrides, "cluster.num_workers=1"]).trainer.global_batch_size
        unpinned = compose([*overrides, "trainer.global_batch_size=0"])  # the workers a preset or override sets
        micro, workers = unpinned.trainer.micro_batch_size, unpinned.cluster.num_workers
        if glob % workers:
            raise
        per_gpu = glob // workers
        m = max(d for d in range(1, min(micro, per_gpu) + 1) if per_gpu % d == 0)
        cfg = compose([*overrides, f"trainer.micro_batch_size={m}"])
        return cfg, (f"trainer.global_batch_size={glob} does not split into micro batches of {micro} on {workers} "
                     f"GPUs: planned with trainer.micro_batch_size={m} (pass it to `sheepop train` too)")
