"""`sheepop train [hydra overrides]`: compose and validate the config, then hand it to the driver."""
from __future__ import annotations

from sheepop.cli.args import hydra_help, wants_help


def main(argv: list[str]) -> int:
    if wants_help(argv):
        return hydra_help(argv, "train")
    from sheepop import startup
    from sheepop.config import compose

    startup.mark("config")  # the CLI's imports (Hydra) and Python's start
    cfg = compose([a for a in argv if a != "--cfg"])
    startup.mark("compose")
    if "--cfg" in argv:
        import yaml

        from sheepop.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from sheepop.driver.runner import run
    from sheepop.train.stop import STOPPED_EXIT_CODE

    result = run(cfg)
    return STOPPED_EXIT_CODE if result.get("stopped") else 0
