"""``zsadx data``: convert raw downloads, write synthetic ones, shard manifests."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset conversion and sharding")
    dsub = p.add_subparsers(dest="data_command", required=True)

    c = dsub.add_parser("convert", help="raw download -> manifest.jsonl (+ summary.json)")
    c.add_argument("dataset", help="catalog name (see `zsadx list datasets`)")
    c.add_argument("--root", required=True, help="folder of the raw download")
    c.add_argument("--out", required=True,
                   help="output folder: new, empty, or one zsadx converted before (only its own files are replaced)")
    c.add_argument("--variant", default=None, help="split variant where the repos disagree")
    c.add_argument("--classes", default=None, type=_class_list,
                   help="comma-separated classes to convert (a partial download), e.g. bottle,grid")
    c.add_argument("--mask-threshold", type=int, default=None, metavar="GREY",
                   help="a mask pixel is anomalous above this grey level 0..254 (default: the dataset's; "
                        "127 for TN3K's JPEG masks, else 0); recorded in the records and the summary")
    c.add_argument("--paper-compat", action="store_true",
                   help="the official loaders' data rules where no option says otherwise (masks cut at > 0)")
    c.add_argument("--workers", type=int, default=4)
    c.set_defaults(func=_convert)

    s = dsub.add_parser("synth", help="write a small synthetic download in a dataset's raw layout")
    s.add_argument("dataset")
    s.add_argument("--root", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-n", type=int, default=1, help="images per group (scales the size)")
    s.set_defaults(func=_synth)

    i = dsub.add_parser("info", help="a dataset's catalog entry: layout, variants, source")
    i.add_argument("dataset")
    i.set_defaults(func=_info)

    from zsadx.data import shards

    shards.add_parser(dsub)


def _class_list(text: str) -> list[str]:
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise argparse.ArgumentTypeError("expected class names separated by commas, e.g. bottle,grid")
    return classes


def _convert(args: argparse.Namespace) -> int:
    from zsadx.data.convert import convert, format_summary

    summary = convert(args.dataset, args.root, args.out, args.variant, workers=args.workers, classes=args.classes,
                      mask_threshold=args.mask_threshold, paper_compat=args.paper_compat)
    print(format_summary(summary))
    print(f"manifest: {args.out}/manifest.jsonl")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from zsadx.data.synthetic import make_raw

    planted = make_raw(args.dataset, args.root, args.seed, n=args.n)
    print(f"wrote {len(planted)} planted images under {args.root}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from zsadx.data.convert.plugins import get_entry

    e = get_entry(args.dataset)
    print(f"{e.name}: {e.title} ({e.domain})\naliases: {', '.join(e.aliases) or '-'}\n"
          f"classes ({len(e.classes)}): {', '.join(e.classes)}\nmasks: {'yes' if e.has_masks else 'no'}\n"
          f"variants: {', '.join(e.variants)} (default {e.default_variant})\nlayout:\n{e.layout}\n"
          f"source: {e.source}\nlicence: {e.licence}\nnotes: {e.notes}")
    return 0
