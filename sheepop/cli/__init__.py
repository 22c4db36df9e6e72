"""`sheepop <command> [hydra overrides | options]`: one module per command in this package.

Commands are imported lazily so `sheepop --help` and config errors answer in well under a
second, before torch, DeepSpeed or Ray are imported. A UserError anywhere becomes one line on
stderr and exit code 2; no traceback.
"""
from __future__ import annotations

import gc
import importlib
import signal
import sys
import threading

from sheepop.errors import UserError

# name → ("module:function", one-line help). Each function takes argv (list[str]) → exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sheepop.cli.train:main", "train a model (Hydra overrides: model=small trainer.max_steps=2000 ...)"),
    "prepare": ("sheepop.cli.prepare:main", "read, tokenize and shard the corpus (data=..., tokenizer=...)"),
    "plan": ("sheepop.cli.plan:main", "parameters, FLOPs, memory per GPU and time, without starting anything"),
    "generate": ("sheepop.cli.generate:main", "sample from a trained run: run.dir=DIR prompt='def '"),
    "eval": ("sheepop.cli.eval:main", "loss and perplexity of a run (run.dir=DIR [data=...]), or lm-eval tasks (tasks=NAME[,NAME])"),
    "export": ("sheepop.cli.export:main", "export weights: run.dir=DIR format=hf out=DIR | format=pt [out=FILE]"),
    "import": ("sheepop.cli.import_hf:main", "import a Hugging Face Llama folder: sheepop import DIR out=RUN_DIR"),
    "watch": ("sheepop.cli.watch:main", "live view of a running job's metrics.jsonl: sheepop watch RUN_DIR"),
    "report": ("sheepop.cli.report:main", "write report.html and report.md for a run: sheepop report RUN_DIR"),
    "submit": ("sheepop.cli.jobs:submit_main", "submit `sheepop train` to a Ray cluster as a Ray Job"),
    "jobs": ("sheepop.cli.jobs:jobs_main", "list Ray Jobs on a cluster"),
    "status": ("sheepop.cli.jobs:status_main", "status of a Ray Job (exit code follows the job's state)"),
    "logs": ("sheepop.cli.jobs:logs_main", "logs of a Ray Job [--follow]"),
    "stop": ("sheepop.cli.jobs:stop_main", "stop a Ray Job"),
}
# Spellings of earlier versions: one line naming the command that replaced them.
RENAMED = {"export-weights": "sheepop export run.dir=DIR format=pt [out=FILE]"}


def usage() -> str:
    lines = ["usage: sheepop <command> [args]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`sheepop <command> --help` for a command's options and config groups."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    code = _command(argv)
    if argv is None:  # the program itself: it ends now
        _before_exit()
    return code


def _before_exit() -> None:
    """CPython's exit runs full garbage collections over every object torch, DeepSpeed and Ray
    made (~330k): 1.0 s of each `sheepop` call's exit here, 0.17 s with them frozen, which those
    collections skip. Nothing is lost: what they would find (objects in reference cycles) is
    memory the OS takes back, and atexit handlers (logging, temp dirs) run as before."""
    gc.freeze()


def _command(argv: list[str] | None) -> int:
    program = argv is None  # the program itself, not a call from Python code
    if program and sys.argv[1:2] == ["train"]:
        from sheepop.cpu_allocator import keep_freed_memory, rerun_with_training_malloc

        rerun_with_training_malloc()  # glibc malloc settings (sheepop.cpu_allocator): runs this command again, once, before any import
        keep_freed_memory()  # from its first allocations on, as a tunable would: cluster=process trains in this process
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command: usage where errors go, and a failing status (scripts notice)
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in RENAMED:
        print(f"sheepop {name}: renamed; use `{RENAMED[name]}`", file=sys.stderr)
        return 2
    if name not in COMMANDS:
        print(f"sheepop: unknown command '{name}'; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    if name == "train" and program and threading.current_thread() is threading.main_thread():
        # Until training installs its own handlers (every rank saves, then stops), a SIGTERM (a
        # scheduler, `kill`) ends start-up with a line like Ctrl-C's, not silently.
        signal.signal(signal.SIGTERM, _terminated)
    try:
        fn = getattr(importlib.import_module(module), func)
        code = fn(rest)
    except UserError as e:
        print(f"sheepop {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (Terminated, SystemExit) as e:
        if isinstance(e, SystemExit) and not (name == "train" and e.code == signal.SIGTERM):
            raise
        # SystemExit(15): ray.init's own SIGTERM handler, in place while it starts a local Ray
        print(f"sheepop {name}: SIGTERM received; stopped (no step was being trained, nothing to save)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"sheepop {name}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training: unwinds like Ctrl-C (finally blocks run: a local Ray is shut down)."""


def _terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
