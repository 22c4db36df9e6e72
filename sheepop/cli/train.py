"""`sheepop train [hydra overrides]`: compose and validate the config, then hand it to the driver."""
from __future__ import annotations

from sheepop.cli.args import hydra_help, wants_help
from sheepop.errors import UserError


def main(argv: list[str]) -> int:
    if wants_help(argv):
        return hydra_help(argv, "train")
    from sheepop import startup
    from sheepop.config import compose

    startup.mark("config")  # the CLI's imports (Hydra) and Python's start
    show = "--cfg" in argv
    after = argv[argv.index("--cfg") + 1:][:1] if show else []
    if after == ["hydra"]:
        raise UserError("--cfg hydra: sheepop train prints its own config only; valid: --cfg or --cfg job")
    if after in (["job"], ["all"]):  # Hydra's spellings of the same
        argv = argv[:argv.index("--cfg") + 1] + argv[argv.index("--cfg") + 2:]
    flags = [a for a in argv if a.startswith("-") and a != "--cfg"]
    if flags:
        raise UserError(f"'{flags[0]}': not a flag of sheepop train; it takes Hydra overrides (key=value), "
                        f"--cfg [job] to print the composed config, and --help")
    cfg = compose([a for a in argv if a != "--cfg"])
    startup.mark("compose")
    if show:
        import yaml

        from sheepop.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from sheepop.driver.runner import run
    from sheepop.train.stop import STOPPED_EXIT_CODE

    result = run(cfg)
    return STOPPED_EXIT_CODE if result.get("stopped") else 0
