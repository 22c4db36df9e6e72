"""Fixed-length training windows from memory-mapped shards, chosen deterministically.

The global batch of step s is a function of (seed, s) alone: B windows drawn with
numpy's generator seeded by [seed, s]. Rank r, micro-batch m takes rows
(m · world + r) · micro … + micro of it. So a resumed run sees the same batches as an
uninterrupted one, ranks see different data, and 2 workers × 1 accumulation step see the
same global batch as 1 worker × 2 steps.

A data mixture (MixtureWindows, data.mixture) keeps all of that: the same generator first picks
each window's source by the normalized weights (systematic sampling: a batch of n windows holds
floor or ceil of n × weight of each source, evened out across steps), then a window of that source; so the tokens each
source contributed by step s are a function of (seed, s) too (source_counts).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VAL_STREAM = 2**31 - 1  # a step number training never reaches: the validation windows' seed
MIX_STREAM = 2**31 - 2  # ... and another: the seed of a data mixture's sampling offset
GOLDEN = (5**0.5 - 1) / 2  # that offset's move per step (the most evenly spreading one)


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


class _Batches:
    """Micro-batches and the validation set of anything with windows(seed, step, n)."""

    def windows(self, seed: int, step: int, n: int) -> np.ndarray:
        raise NotImplementedError

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


class TokenWindows(_Batches):
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
        return self.draw(np.random.default_rng([seed, step]), n)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n windows drawn with `rng` (a shard by its share of window starts, then an offset)."""
        shard = rng.choice(len(self.shards), size=n, p=self.weights)
        offset = rng.integers(0, self.starts[shard])
        return np.stack([self.shards[s][o:o + self.seq_len + 1] for s, o in zip(shard, offset)]).astype(np.int64)


class MixtureWindows(_Batches):
    """Windows from several prepared corpora (data.mixture): each window's source drawn by weight
    (the weights are normalized; a window is seq_len tokens whatever its source, so window shares are
    token shares), then a window of that source; all from the generator seeded [seed, step]."""

    def __init__(self, sources: list[TokenWindows], weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        if len(sources) != len(w) or not len(w) or (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"mixture weights {list(weights)} for {len(sources)} source(s): need one each, >= 0, "
                             "with a positive sum")
        self.sources = sources
        self.weights = w / w.sum()
        self.seq_len = sources[0].seq_len

    def _sources(self, seed: int, step: int, rng: np.random.Generator, n: int) -> np.ndarray:
        """Each of n windows' source: systematic sampling (n evenly spaced points through the
        cumulative weights), so a batch holds floor or ceil of n × weight windows of each source;
        the points' offset moves by the golden ratio from step to step (from a start drawn from
        the seed), so which sources get the ceil evens out over any run of steps and the mix stays
        within a few windows of the weights (independent draws would stray ~sqrt(windows)). Then
        shuffled over the batch's rows with the step's generator (its first draw)."""
        offset = (np.random.default_rng([seed, MIX_STREAM]).random() + step * GOLDEN) % 1.0
        cum = np.cumsum(self.weights)
        src = np.minimum(np.searchsorted(cum, (np.arange(n) + offset) / n, side="right"), len(self.sources) - 1)
        return rng.permutation(src)

    def windows(self, seed: int, step: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        src = self._sources(seed, step, rng, n)
        rows = np.empty((n, self.seq_len + 1), dtype=np.int64)
        for k, source in enumerate(self.sources):  # in source order: the same draws on every rank
            idx = np.flatnonzero(src == k)
            if len(idx):
                rows[idx] = source.draw(rng, len(idx))
        return rows

    def source_of(self, seed: int, step: int, n: int) -> np.ndarray:
        """(n,) the source index of each window of windows(seed, step, n)."""
        return self._sources(seed, step, np.random.default_rng([seed, step]), n)

    def source_counts(self, seed: int, step: int, n: int) -> np.ndarray:
        """(sources,) windows each source gives to the global batch of n windows at `step`."""
        return np.bincount(self.source_of(seed, step, n), minlength=len(self.sources))
