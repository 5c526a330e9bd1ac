"""The ``zsadx`` command line. Each subcommand lives in the module that does the work."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from zsadx.errors import UserError
from zsadx.files import disk_full

Command = Callable[[argparse.Namespace], int]


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from zsadx.models.methods import load_all

        reg = load_all()
        if not len(reg):
            print("no methods registered yet")
        for name, spec in reg.items():
            print(f"{name:14s} {getattr(spec, 'summary', '')}")
    elif args.what == "datasets":
        from zsadx.data.convert.plugins import load_all

        reg = load_all()
        if not len(reg):
            print("no datasets registered yet")
        else:
            print(f"{'name':16s} {'domain':10s} {'classes':>7s} {'masks':5s} title")
        for name, plugin in reg.items():
            e = plugin.entry
            print(f"{name:16s} {e.domain:10s} {len(e.classes):7d} {'yes' if e.has_masks else 'no':5s} {e.title}")
    elif args.what == "backbones":
        from zsadx.config import config_root

        for p in sorted((config_root() / "backbones").glob("*.yaml")):
            print(p.stem)
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    """Trainable parameters of a method as configured (random backbone weights: only shapes matter)."""
    from dataclasses import replace

    from zsadx.config import load_config, load_yaml
    from zsadx.eval.evaluator import EvalConfig
    from zsadx.models.methods.base import build_method

    cfg = load_config(EvalConfig, data={"method": load_yaml(args.method), "data": {"shards": "-", "dataset": "-"}},
                      overrides=[f"method.{o}" for o in args.overrides]).method
    cfg.backbone = replace(cfg.backbone, pretrained=None)
    method = build_method(cfg)
    groups = method.param_groups() if hasattr(method, "param_groups") else {"all": method.trainable_parameters()}
    frozen = sum(p.numel() for p in method.backbone.parameters())
    print(f"{cfg.name} on {cfg.backbone.name} @ {cfg.backbone.image_size}px")
    for name, p in method.named_parameters():
        if p.requires_grad:
            print(f"  {name:36s} {str(tuple(p.shape)):>18s} {p.numel():>14,d}")
    for g, params in groups.items():
        print(f"{'group ' + g:57s} {sum(p.numel() for p in params):>14,d}")
    total = sum(p.numel() for p in method.trainable_parameters())
    print(f"{'trainable':57s} {total:>14,d}\n{'frozen backbone':57s} {frozen:>14,d}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsadx", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (or set ZSADX_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered methods, datasets or backbone configs")
    p.add_argument("what", choices=["methods", "datasets", "backbones"])
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("params", help="count a method's trainable parameters as configured")
    p.add_argument("method", help="method config, e.g. methods/anomalyclip")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the method config, e.g. n_ctx=12")
    p.set_defaults(func=_cmd_params)

    from zsadx import demo

    demo.add_parser(sub)
    for module in _optional_command_modules():
        module.add_parser(sub)
    return parser


def _optional_command_modules() -> list:
    """Subcommand modules added by later parts of the package (data, eval, train, grid, ...)."""
    import importlib

    mods = []
    for name in ("zsadx.data.cli", "zsadx.eval.cli", "zsadx.predict", "zsadx.train", "zsadx.models.official.cli",
                 "launch.cli"):
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return mods


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # open_clip logs chatty INFO lines on the root logger; keep the root at WARNING, zsadx at INFO.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("zsadx").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("launch").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    debug = args.debug or os.environ.get("ZSADX_DEBUG", "") not in ("", "0")
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `zsadx list datasets | head`: the reader left, nothing went wrong
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        error = user_error(exc)
        if error is None or debug:
            raise
        print(f"zsadx {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> BaseException | None:
    """The error to show a user in one line, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError):
        full = disk_full(exc, exc.filename or "?")
        if full is not None:
            return full
        if exc.filename is not None or isinstance(exc, FileNotFoundError):
            return exc  # missing file, permission denied, ...: the message names the file
    return None


def one_line(exc: BaseException) -> str:
    """The message on one line (multi-line messages such as layouts are joined with ' | ')."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc)
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
