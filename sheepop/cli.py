"""`sheepop <command> [hydra overrides | options]`: each command is a thin call into a module.

Commands are imported lazily so `sheepop --help` and config errors answer in well under a
second, before torch, DeepSpeed or Ray are imported. A UserError anywhere becomes one line on
stderr and exit code 2; no traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

from sheepop.errors import UserError

# name → ("module:function", one-line help). Each function takes argv (list[str]) → exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sheepop.commands:train", "train a model (Hydra overrides: model=small trainer.max_steps=2000 ...)"),
    "prepare": ("sheepop.commands:prepare", "read, tokenize and shard the corpus (data=..., tokenizer=...)"),
    "generate": ("sheepop.commands:generate", "sample from a trained run: run.dir=DIR prompt='def '"),
    "export-weights": ("sheepop.commands:export_weights", "write consolidated fp32 weights: run.dir=DIR [out=FILE]"),
    "eval": ("sheepop.evaluate:main", "loss and perplexity of a run on a split or files: run.dir=DIR [data=...]"),
    "submit": ("sheepop.jobs:submit_main", "submit `sheepop train` to a Ray cluster as a Ray Job"),
    "jobs": ("sheepop.jobs:jobs_main", "list Ray Jobs on a cluster"),
    "status": ("sheepop.jobs:status_main", "status of a Ray Job (exit code follows the job's state)"),
    "logs": ("sheepop.jobs:logs_main", "logs of a Ray Job [--follow]"),
    "stop": ("sheepop.jobs:stop_main", "stop a Ray Job"),
    "watch": ("sheepop.watch:main", "live view of a running job's metrics.jsonl: sheepop watch RUN_DIR"),
    "report": ("sheepop.report:main", "write report.html and report.md for a run: sheepop report RUN_DIR"),
    "plan": ("sheepop.plan:main", "parameters, FLOPs, memory per GPU and time, without starting anything"),
    "export": ("sheepop.export:main", "export to Hugging Face format: run.dir=DIR format=hf out=DIR"),
}


def usage() -> str:
    lines = ["usage: sheepop <command> [args]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`sheepop <command> --help` for a command's options and config groups."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sheepop: unknown command '{name}'; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    try:
        fn = getattr(importlib.import_module(module), func)
        code = fn(rest)
    except UserError as e:
        print(f"sheepop {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sheepop {name}: interrupted", file=sys.stderr)
        return 130
    except (ModuleNotFoundError, AttributeError) as e:
        if os.environ.get("SHEEPOP_DEBUG"):
            raise
        if getattr(e, "name", "") and str(getattr(e, "name", "")).startswith("sheepop"):
            print(f"sheepop {name}: not available in this version ({e})", file=sys.stderr)
            return 2
        raise
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
