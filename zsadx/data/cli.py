"""``zsadx data``: convert raw downloads, write synthetic ones, shard manifests."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset conversion and sharding")
    dsub = p.add_subparsers(dest="data_command", required=True)

    c = dsub.add_parser("convert", help="raw download -> manifest.jsonl (+ summary.json)")
    c.add_argument("dataset", help="catalog name (see `zsadx list datasets`)")
    c.add_argument("--root", default=None,
                   help="folder of the raw download; with --from: the folder the index's paths are relative to "
                        "(default for a meta.json: its folder; required for a jsonl)")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--from", dest="index", default=None, metavar="INDEX",
                     help="take the records from an index prepared for the official code, format detected: "
                          "AnomalyCLIP's meta.json (also read by AdaCLIP, FAPrompt) or ACD-CLIP's jsonl")
    src.add_argument("--from-meta", dest="index_meta", default=None, metavar="META_JSON",
                     help="as --from, the file being a meta.json")
    src.add_argument("--from-jsonl", dest="index_jsonl", default=None, metavar="JSONL",
                     help="as --from, the file being ACD-CLIP's jsonl (needs --root: its paths are relative to "
                          "the dataset folder)")
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
    c.add_argument("--hold-out", type=int, default=0, metavar="N",
                   help="per class, move N normal test images (seeded) into the train split: few-shot references "
                        "for data without one, e.g. your own normal/ + anomalous/ folders")
    c.add_argument("--hold-out-seed", type=int, default=0, metavar="S", help="seed of the --hold-out draw")
    c.add_argument("--workers", type=int, default=4)
    c.set_defaults(func=_convert)

    s = dsub.add_parser("synth", help="write a small synthetic download in a dataset's raw layout")
    s.add_argument("dataset")
    s.add_argument("--root", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-n", type=int, default=1, help="images per group (scales the size)")
    s.set_defaults(func=_synth)

    e = dsub.add_parser("export-meta", help="manifest -> AnomalyCLIP's meta.json, to run the official code on "
                                             "exactly these records")
    e.add_argument("manifest", help="manifest.jsonl or the converted dataset folder")
    e.add_argument("--out", required=True, help="the meta.json to write (a new file)")
    e.add_argument("--root", default=None,
                   help="the folder the paths are relative to (default: the conversion's raw root where it holds "
                        "every file, else the files' common folder); the official code's dataset root")
    e.add_argument("--names", default=None, choices=("anomalyclip", "adaclip", "acd-clip"),
                   help="write that repo's class names for its processed copies (default: zsadx's)")
    e.set_defaults(func=_export_meta)

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

    index, fmt = _index_source(args)
    summary = convert(args.dataset, args.root, args.out, args.variant, workers=args.workers, classes=args.classes,
                      mask_threshold=args.mask_threshold, paper_compat=args.paper_compat, index=index,
                      index_format=fmt, hold_out=args.hold_out, hold_out_seed=args.hold_out_seed)
    print(format_summary(summary))
    print(f"manifest: {args.out}/manifest.jsonl")
    return 0


def _index_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(the index file, its format or None to detect) of --from / --from-meta / --from-jsonl."""
    if args.index_meta:
        return args.index_meta, "meta"
    if args.index_jsonl:
        return args.index_jsonl, "jsonl"
    return args.index, None


def _export_meta(args: argparse.Namespace) -> int:
    from zsadx.data.convert.prepared import export_meta

    done = export_meta(args.manifest, args.out, root=args.root, repo=args.names)
    left = ", ".join(f"{n} of split {s}" for s, n in done["left_out"].items())
    print(f"wrote {done['out']}: {done['records']} records, classes {', '.join(done['classes'])}; paths relative to "
          f"{done['root']} (the official code's dataset root)" + (f"; left out {left} (meta.json has train and "
                                                                   f"test only)" if left else ""))
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
