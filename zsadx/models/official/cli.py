"""``zsadx import METHOD FILE --out ckpt.pt``: an official repository's checkpoint as a zsadx
checkpoint (final.pt's format, with the method and backbone identity of the method config)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("zsadx.models.official")


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="convert an official repository's checkpoint (e.g. AnomalyCLIP's "
                                      "epoch_15.pth) into a zsadx checkpoint")
    p.add_argument("method", help="method name or config: anomalyclip (= methods/anomalyclip), methods/faprompt-tiny, ...")
    p.add_argument("file", help="the official checkpoint file")
    p.add_argument("--out", required=True, help="the zsadx checkpoint to write (refused if it exists)")
    # An option, not trailing positionals: argparse would not take those after --out.
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="dotted overrides of the method config, e.g. --set n_ctx=12 backbone.pretrained=...")
    p.set_defaults(func=_main)


def method_config_path(method: str) -> str:
    """A bare method name means its config under configs/methods."""
    return method if "/" in method or method.endswith((".yaml", ".yml")) else f"methods/{method}"


def _main(args: argparse.Namespace) -> int:
    from zsadx.config import load_config, load_yaml
    from zsadx.models.checkpoints import CheckpointError, checkpoint_file, safe_load, save_method_checkpoint
    from zsadx.models.methods.base import build_method, method_config_type
    from zsadx.models.official import convert_official, describe

    out = Path(args.out)
    if out.exists():
        raise CheckpointError(f"{out}: exists; zsadx import writes a new file (remove it or choose another --out)")
    file = checkpoint_file(args.file)
    data = load_yaml(method_config_path(args.method))
    cfg = load_config(method_config_type(data, "method"), data=data, overrides=args.overrides)
    obj = safe_load(file)
    method = build_method(cfg)
    try:
        found = convert_official(obj, method)
    except CheckpointError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    if found is None:
        raise CheckpointError(f"{file}: not an official checkpoint zsadx knows (a zsadx checkpoint needs no "
                              f"import: pass it to --checkpoint)")
    method.load_trainable_state_dict(found[1].state)
    save_method_checkpoint(method, out)
    print(f"{file}: {describe(*found)}\nwrote {out} ({cfg.name} on {cfg.backbone.name})")
    return 0
