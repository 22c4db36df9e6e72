"""Where a worker group Ray Train restarted continues from (sheepop.train.restart): Ray's recorded
checkpoint, or a newer one this launch completed in storage. Checkpoint folders are laid out as
checkpoint.save and checkpoint_files.upload leave them (files, meta.json, each rank's manifest);
the end-to-end case with a real killed worker is in tests/integration/test_distributed.py."""
import json
from pathlib import Path

from sheepop.train import checkpoint_files
from sheepop.train.restart import continue_from, newest_of_launch, unfinished_after

LAUNCH = "this-launch"


def saved(root: Path, step: int, launch: str = LAUNCH, ranks=(0, 1), complete: bool = True) -> str:
    """A checkpoint of a 2-rank run; complete=False: rank 1's manifest never arrived (it died)."""
    local = root / checkpoint_files.name(step)
    for r in ranks:
        (local / "ds").mkdir(parents=True, exist_ok=True)
        (local / "ds" / f"zero_pp_rank_{r}_optim_states.pt").write_bytes(b"x" * (10 + step))
    (local / "meta.json").write_text(json.dumps({"step": step, "launch": launch, "world_size": len(ranks)}))
    for r in ranks if complete else ranks[:1]:
        own = [f"ds/zero_pp_rank_{r}_optim_states.pt"] + (["meta.json"] if r == 0 else [])
        (local / checkpoint_files.marker(r)).parent.mkdir(exist_ok=True)
        (local / checkpoint_files.marker(r)).write_text(json.dumps(checkpoint_files.manifest(local, own)))
    return str(local)


def test_a_newer_complete_checkpoint_of_this_launch_wins_over_rays(tmp_path):
    five, ten = saved(tmp_path, 5), saved(tmp_path, 10)
    assert checkpoint_files.problem(ten) is None
    # Ray's controller had taken step 5's report only: step 10 completed after its last poll.
    assert continue_from(str(tmp_path), LAUNCH, recorded=five, resume=None, rank=0) == ten
    # Nothing recorded yet (a restart before the first poll): still step 10, not step 0.
    assert continue_from(str(tmp_path), LAUNCH, recorded=None, resume=None, rank=0) == ten


def test_rays_checkpoint_stays_when_storage_has_nothing_newer(tmp_path):
    five = saved(tmp_path, 5)
    half = saved(tmp_path, 10, complete=False)  # the dead group's unfinished upload
    assert continue_from(str(tmp_path), LAUNCH, recorded=five, resume=None, rank=0) == five
    assert not Path(half).exists()  # removed before the same step is saved again over it
    assert Path(five).is_dir()


def test_checkpoints_of_another_launch_are_not_this_runs(tmp_path):
    """A run that resumed from step 6 into a folder where an earlier run left step 20."""
    saved(tmp_path, 20, launch="earlier")
    six = saved(tmp_path, 6, launch="earlier")
    assert newest_of_launch(checkpoint_files.list_checkpoints(tmp_path), LAUNCH, after_step=6) is None
    assert continue_from(str(tmp_path), LAUNCH, recorded=None, resume=six, rank=0) is None  # = the plan's resume
    assert Path(tmp_path / "step_000020").is_dir()  # complete checkpoints are never removed here
    eight = saved(tmp_path, 8)
    assert continue_from(str(tmp_path), LAUNCH, recorded=None, resume=six, rank=0) == eight


def test_the_first_start_keeps_the_plan(tmp_path):
    """On the first start nothing of this launch exists: the plan's resume stands (None returned),
    and only older, never-finished leftovers newer than it are cleared."""
    resume = saved(tmp_path, 4, launch="earlier")
    older_half = saved(tmp_path, 2, launch="earlier", complete=False)
    newer_half = saved(tmp_path, 8, launch="earlier", complete=False)
    assert unfinished_after(checkpoint_files.list_checkpoints(tmp_path), 4) == [newer_half]
    assert continue_from(str(tmp_path), LAUNCH, recorded=None, resume=resume, rank=0) is None
    assert Path(older_half).is_dir() and not Path(newer_half).exists()


def test_only_rank_zero_decides(tmp_path):
    """Without a process group (one rank) a rank other than 0 keeps what Ray gave it; in a group it
    takes rank 0's broadcast answer (tests/integration/test_distributed.py)."""
    five = saved(tmp_path, 5)
    saved(tmp_path, 10)
    assert continue_from(str(tmp_path), LAUNCH, recorded=five, resume=None, rank=1) == five
