"""Fixed-length training windows from memory-mapped shards, chosen deterministically.

The global batch of step s is a function of (seed, s) alone: B windows drawn with
numpy's generator seeded by [seed, s]. Rank r, micro-batch m takes rows
(m · world + r) · micro … + micro of it. So a resumed run sees the same batches as an
uninterrupted one, ranks see different data, and 2 workers × 1 accumulation step see the
same global batch as 1 worker × 2 steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VAL_STREAM = 2**31 - 1  # a step number training never reaches: the validation windows' seed


def data_step(step: int, skipped: list[int] | set[int]) -> int:
    """The data window (0-based) the optimizer step with 0-based index `step` trains on, when the
    windows of `skipped` steps (1-based, as metrics.jsonl counts them) are never used: a run that
    skips step 30's data takes step 31's window at step 30, and so on. Without skips: `step`."""
    window = step
    for s in sorted(skipped):
        if s - 1 <= window:
            window += 1
    return window


def document_ids(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) index of the document each input position belongs to, counted from 0 in each window
    (data.document_mask; the model builds its attention mask and positions from it).

    The data pipeline puts <|endoftext|> after every document, so an EOT token closes its
    document and belongs to it (the token after it starts the next one): the id is the number of
    EOTs strictly before the position. The first document of a window is usually a tail."""
    eot = (x == eot_id).long()
    return eot.cumsum(dim=1) - eot


class TokenWindows:
    def __init__(self, data_dir: str | Path, manifest: dict, split: str, seq_len: int):
        self.seq_len = seq_len
        dtype = np.dtype(manifest["dtype"])
        self.shards = [np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r")
                       for s in manifest["splits"][split]["shards"]]
        # Windows need seq_len + 1 tokens (inputs and next-token targets).
        self.starts = np.array([max(0, len(s) - seq_len - 1) for s in self.shards])
        if self.starts.sum() == 0:
            raise ValueError(f"{split} split has {manifest['splits'][split]['tokens']} tokens: "
                             f"too few for one window of {seq_len + 1}")
        self.weights = self.starts / self.starts.sum()

    def windows(self, seed: int, step: int, n: int) -> np.ndarray:
        """(n, seq_len + 1) token windows of the global batch at `step`."""
        rng = np.random.default_rng([seed, step])
        shard = rng.choice(len(self.shards), size=n, p=self.weights)
        offset = rng.integers(0, self.starts[shard])
        return np.stack([self.shards[s][o:o + self.seq_len + 1] for s, o in zip(shard, offset)]).astype(np.int64)

    def micro_batch(self, seed: int, step: int, *, rank: int, world: int, micro: int, accum: int,
                    index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.windows(seed, step, micro * accum * world)
        start = (index * world + rank) * micro
        w = torch.from_numpy(rows[start:start + micro])
        return w[:, :-1], w[:, 1:]

    def val_batches(self, seed: int, *, rank: int, world: int, micro: int, batches: int):
        """The fixed validation set (same for every eval, every world size), this rank's share."""
        rows = self.windows(seed, VAL_STREAM, micro * batches)
        mine = torch.from_numpy(rows[rank::world])
        for i in range(0, len(mine), micro):
            w = mine[i:i + micro]
            yield w[:, :-1], w[:, 1:]
