"""``zsadx train`` / ``accelerate launch -m zsadx.train --config ...``: train a method's prompts/adapters."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a method (run it under `accelerate launch` for several processes)")
    _arguments(p)
    p.set_defaults(func=_main)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config, e.g. train/anomalyclip-tiny")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=2 resume=latest")


def _main(args: argparse.Namespace) -> int:
    from zsadx.config import load_config
    from zsadx.training.config import TrainConfig
    from zsadx.training.loop import train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = train(cfg)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from zsadx.cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
