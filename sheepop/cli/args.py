"""The argument conventions every command follows, in one place.

Three kinds of command, one style each:
  - commands that build a run's config (train, prepare, plan, submit): Hydra overrides
    (`model=small trainer.lr=3e-4`), composed and validated by sheepop.config;
  - commands that read a finished run (generate, eval, export, watch, report): `key=value`
    options parsed by `parse_kv` against a typed spec (a leading RUN_DIR where the command
    is about one run);
  - commands that talk to a Ray cluster about jobs (jobs, status, logs, stop): argparse flags,
    since they take a job id and `--address` rather than config.
Each spelling error is one UserError line naming the valid keys.
"""
from __future__ import annotations

import math
import sys

from sheepop.errors import UserError


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help", "--hydra-help") for a in argv)


def hydra_help(argv: list[str], command: str) -> int:
    """Hydra's own --help (config groups and the composed config), via a throwaway @hydra.main app."""
    import hydra

    from sheepop.config import conf_dir

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _app(_cfg):  # pragma: no cover - Hydra exits after printing help
        pass

    from sheepop.config import compose

    overrides = [a for a in argv if not a.startswith("-")]
    compose(overrides)  # a bad override is its one line here, not Hydra's traceback
    saved = sys.argv
    # Flags first: Hydra's argparse takes no override after a flag (`model=tiny --help`).
    sys.argv = [f"sheepop {command}", *[a for a in argv if a.startswith("-")], *overrides,
                "hydra.help.app_name=sheepop " + command, "hydra/hydra_logging=disabled", "hydra/job_logging=disabled"]
    try:
        _app()
    finally:
        sys.argv = saved
    return 0


def parse_kv(argv: list[str], spec: dict[str, type], command: str) -> dict:
    """key=value options of the commands that read a run; unknown keys fail with the valid ones.
    A bool option may also be given as a flag (`--force`)."""
    out: dict = {}
    for a in argv:
        if a.startswith("--") and a[2:] in spec and spec[a[2:]] is bool:
            out[a[2:]] = True
            continue
        if "=" not in a:
            raise UserError(f"'{a}': expected key=value; valid keys: {', '.join(spec)}")
        k, v = a.split("=", 1)
        k = k.lstrip("-")
        if k not in spec:
            raise UserError(f"unknown option '{k}'; valid for {command}: {', '.join(spec)}")
        out[k] = _value(k, v, spec[k])
    return out


TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _value(key: str, text: str, typ: type):
    """`text` as a `typ`: a bool is one of TRUE/FALSE (a typo is not false), a float is finite."""
    if typ is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise UserError(f"{key}={text}: expected true or false")
    try:
        value = typ(text)
    except ValueError:
        raise UserError(f"{key}={text}: expected {'a number' if typ is float else typ.__name__}") from None
    if typ is float and not math.isfinite(value):
        raise UserError(f"{key}={text}: expected a finite number")
    return value


def bench_options(argv: list[str], spec: dict[str, type], script: str) -> dict:
    """parse_kv for the scripts under bench/: a bad option is one line and a non-zero exit, no traceback."""
    try:
        return parse_kv(argv, spec, script)
    except UserError as e:
        raise SystemExit(str(e) if script in str(e) else f"{script}: {e}") from None


def require(opts: dict, keys: tuple[str, ...], usage: str) -> None:
    """One line naming the first missing required option and the command's usage."""
    for key in keys:
        if key not in opts:
            raise UserError(f"missing {key}=...; {usage}")
