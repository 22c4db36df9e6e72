"""`sheepop watch RUN_DIR`: follow a run's metrics.jsonl with the live view and a loss sparkline.

It needs nothing but read access to the run directory (no W&B, no Ray), and exits when the
run's latest attempt logs its `end` event. Steps re-run after a restart show once, with their
latest values (sheepop.monitor.live.Progress).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from sheepop.cli.args import parse_kv, wants_help
from sheepop.errors import UserError
from sheepop.units import duration

OPTIONS = {"poll": float, "timeout": float, "plain": bool, "every": float}
USAGE = ("usage: sheepop watch RUN_DIR [poll=SECONDS] [timeout=SECONDS] [plain=true] [every=SECONDS]\n"
         "  poll: how often metrics.jsonl is read (0.5); timeout: give up after this long (none);\n"
         "  plain: print lines instead of the animated view (default when not a terminal);\n"
         "  every: seconds between plain lines (10)")


def total_steps(run_dir: Path) -> int:
    """trainer.max_steps from the run's config.yaml (the latest attempt's, as it is rewritten on resume)."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        return int(cfg["trainer"]["max_steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return 0


def main(argv: list[str]) -> int:
    if not argv or wants_help(argv):
        print(USAGE)
        return 0 if argv else 2
    from sheepop import storage
    from sheepop.monitor.metrics_file import StorageFollower, local_run

    if argv[0].startswith("run.dir="):  # as the other commands take it
        argv = [argv[0].split("=", 1)[1], *argv[1:]]
    opts = parse_kv(argv[1:], OPTIONS, "watch")
    for key, least in (("poll", 0.0), ("timeout", 0.0), ("every", None)):  # every=0: a line at each poll
        if key in opts and (opts[key] < 0 if least is None else opts[key] <= least):
            raise UserError(f"{key}={opts[key]}: must be {'>= 0' if least is None else '> 0'} seconds")
    remote = storage.is_uri(argv[0])
    storage.check_readable(argv[0], "RUN_DIR")
    if remote and not storage.is_file(storage.join(argv[0], "config.yaml")):
        raise UserError(f"RUN_DIR={argv[0]}: no config.yaml there; pass <cluster.storage_path>/<run.name> of a run")
    run_dir = local_run(argv[0])
    follower = StorageFollower(storage.normalize(argv[0]), run_dir, every=max(2.0, opts.get("poll", 0.5))) \
        if remote else None
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR={argv[0]}: no such directory; pass the run.dir of a training run "
                        "(the folder holding metrics.jsonl)")
    if not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists():
        raise UserError(f"RUN_DIR={argv[0]}: neither metrics.jsonl nor config.yaml here; "
                        "pass the run.dir of a training run")
    from rich.console import Console

    from sheepop.monitor.live import LiveView

    console = Console()
    view = LiveView(run_dir, lambda: total_steps(run_dir), console, poll_s=opts.get("poll", 0.5), sparkline=True,
                    plain=opts.get("plain"), plain_every_s=opts.get("every", 10.0))
    if view.snap.total == 0:
        console.print(f"{run_dir}: no config.yaml yet; the step total will show once it appears")
    try:
        snap = view.run_until_end(opts.get("timeout"))
    finally:
        if follower is not None:
            follower.stop()
    if not snap.ended:
        console.print(f"watch: stopped after {duration(opts.get('timeout'))} without an `end` event")
        return 1
    console.print(f"run ended at step {snap.step}/{snap.total}"
                  + (f", final val loss {snap.val_loss:.4f}" if snap.val_loss is not None else "")
                  + (f" (attempt {snap.attempt})" if snap.attempt else ""))
    return 0
