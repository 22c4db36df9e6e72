"""The run plan: everything the driver decided, handed to every rank as one typed object.

The driver (sheepop.driver.runner) decides each thing once — the batch plan for the world size,
the checkpoint to resume from and whether it must go through DeepSpeed's universal format, the
prepared data — and every rank receives this plan. Ranks verify it (world size, data on their
node) and never decide again. The one exception is Ray Train's own restart after a worker
failure, where no driver is asked: the restarted group's rank 0 picks the checkpoint to continue
from (the newer of the one Ray Train recorded and the newest this launch completed in storage) and
every rank takes its answer (sheepop.train.restart).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sheepop.config import BatchPlan, Config
from sheepop.data.mixture import PreparedSource
from sheepop.errors import UserError


@dataclass(frozen=True)
class RunPlan:
    cfg: Config  # the resolved, validated config (secrets included: never written as is)
    batch: BatchPlan  # micro batch, accumulation, global batch for batch.world_size ranks
    resume: str | None  # checkpoint to start from (a local folder or a storage URI); None = step 0
    universal: str | None  # its universal-format copy, when the world size or ZeRO stage changed
    manifest: dict  # the prepared data's manifest.json (fingerprint, shards) in cfg.data.out_dir; with a
    # data mixture, its first source's (the tokenizer every source shares)
    stop_channel: str | None = None  # name of the run's StopFlag actor (Ray runs; sheepop.train.stop)
    init_from: str | None = None  # a Hugging Face Llama folder whose weights a fresh start loads (None on a resume)
    # Batch plans for the smaller worlds an elastic run (cluster.min_workers) may restart in: the
    # same global batch, more accumulation.
    elastic: dict[int, BatchPlan] = field(default_factory=dict)
    # data.mixture: every source's name, folder, normalized weight and manifest (sheepop.data.mixture
    # .PreparedSource), checked by the driver; empty = the one corpus in cfg.data.out_dir.
    mixture: tuple[PreparedSource, ...] = ()
    # sheepop.startup: when the driver's phases ended (wall clock; "launch" = the `sheepop` process's
    # start); rank 0 adds its own and logs them in its start event.
    startup: dict[str, float] = field(default_factory=dict)
    # This `sheepop train`'s id, in every checkpoint it saves (meta.json "launch"): a restarted worker
    # group tells the checkpoints of its own launch from older ones in the same folder.
    launch: str = field(default_factory=lambda: uuid.uuid4().hex)

    def batch_for(self, world_size: int) -> BatchPlan:
        """A rank's check that it runs in a world the plan was made for; that world's batch plan."""
        if world_size == self.batch.world_size:
            return self.batch
        if world_size in self.elastic:
            return self.elastic[world_size]
        sizes = sorted({self.batch.world_size, *self.elastic})
        raise UserError(f"this rank runs in a world of {world_size}, the run plan was made for "
                        f"{' or '.join(map(str, sizes))} (cluster.num_workers, cluster.min_workers); "
                        "the driver must plan again")
