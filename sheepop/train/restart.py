"""Where a worker group that Ray Train restarted after a failure continues from.

Ray Train hands a restarted group the last checkpoint its controller has *taken*: the controller
takes a rank's report only when it polls the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), after the
asynchronous upload. A worker that dies between a checkpoint's completion in storage and that poll
would send the run back to an older checkpoint (or to step 0), and the steps between would be
trained again. So the restarted group's rank 0 looks in storage too and takes the newest complete
checkpoint that this launch saved (meta.json "launch" = RunPlan.launch; a checkpoint left in the
same folder by an earlier `sheepop train` is not this run's to continue from) when it is newer than
Ray's. One decision, broadcast: ranks reading storage each for themselves could see different
answers.
"""
from __future__ import annotations

import torch.distributed as dist

from sheepop import storage
from sheepop.train.checkpoint_files import list_checkpoints, problem, read_meta, step_of


def newest_of_launch(found: list[str], launch: str, after_step: int) -> str | None:
    """The newest complete checkpoint of `found` (list_checkpoints) that launch `launch` saved after
    step `after_step`."""
    for ckpt in reversed(found):
        if step_of(ckpt) <= after_step:
            return None
        if problem(ckpt) is None and read_meta(ckpt).get("launch") == launch:
            return ckpt
    return None


def unfinished_after(found: list[str], step: int) -> list[str]:
    """Checkpoints of `found` newer than `step` that never completed: a dead group's half-uploaded
    saves. They go before training restarts, or the same step saved again would mix with their files
    (the manifests check sizes, and a rank's new files replace its old ones one by one)."""
    return [c for c in found if step_of(c) > step and problem(c) is not None]


def continue_from(ckpt_root: str, launch: str, recorded: str | None, resume: str | None, rank: int) -> str | None:
    """Every rank calls this when Ray Train starts (or restarts) the group; returns the checkpoint to
    load (None: plan.resume, a start from the run plan). recorded: what Ray Train handed this rank;
    resume: the run plan's checkpoint. On the first start nothing of this launch is in storage yet,
    so the answer is Ray's (None)."""
    choice = [recorded]
    if rank == 0:
        # resume may be any folder with a checkpoint (trainer.resume=PATH): its step is in its meta.json
        floor = step_of(recorded) if recorded is not None else read_meta(resume)["step"] if resume is not None else -1
        found = list_checkpoints(ckpt_root)  # one listing for both questions
        choice[0] = newest_of_launch(found, launch, floor) or recorded
        for leftover in unfinished_after(found, step_of(choice[0]) if choice[0] is not None else floor):
            storage.remove(leftover)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]

