"""``zsadx eval``: a method over a dataset's shards -> results file. Works under accelerate launch."""
from __future__ import annotations

import argparse
import json
import math


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a method on a dataset's eval shards")
    p.add_argument("--method", required=True, help="method config, e.g. methods/clip-tiny")
    p.add_argument("--shards", required=True, help="shard folder (with index.json), or an http(s):// or pipe: root")
    p.add_argument("--dataset", required=True)
    p.add_argument("--classes", nargs="*", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=16 method.sigma=0")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from zsadx.config import load_config, load_yaml
    from zsadx.eval.evaluator import EvalConfig, evaluate

    data = {"method": load_yaml(args.method),
            "data": {"shards": args.shards, "dataset": args.dataset, "classes": args.classes},
            "checkpoint": args.checkpoint, "out_dir": args.out}
    cfg = with_tracker_overlays(load_config(EvalConfig, data=data, overrides=args.overrides))
    results = evaluate(cfg)
    if results is not None:
        print(format_results(results))
        track_results(cfg, results)
    return 0


def with_tracker_overlays(cfg):
    """Trackers show a few overlays: with tracking on and none saved, one per class is saved."""
    if cfg.tracking.log_with and cfg.tracking.images and not cfg.save_overlays:
        cfg.save_overlays = 1
    return cfg


def track_results(cfg, results: dict) -> None:
    """Send an evaluation's results (rank 0's, once evaluate() returned them) to its trackers."""
    if not cfg.tracking.log_with:
        return
    from pathlib import Path

    from zsadx.eval.evaluator import results_stem
    from zsadx.tracking import log_evaluation

    log_evaluation(cfg.tracking, results, cfg.out_dir, Path(cfg.out_dir) / "overlays" / results_stem(cfg))


def format_results(r: dict) -> str:
    keys = [k for k in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
                        "pixel_aupro") if k in r["mean"]]
    head = f"{'class':20s} " + " ".join(f"{k:>13s}" for k in keys)
    rows = [head]
    fmt = lambda v: f"{100 * v:13.1f}" if v is not None and not math.isnan(v) else f"{'n/a':>13s}"
    for c, m in r["per_class"].items():
        rows.append(f"{c:20s} " + " ".join(fmt(m.get(k)) for k in keys))
    rows.append(f"{'mean':20s} " + " ".join(fmt(r['mean'].get(k)) for k in keys))
    if r["undefined"]:
        rows.append("undefined (left out of the mean): " + json.dumps(r["undefined"]))
    if r.get("pixel_excluded"):
        rows.append(f"{r['pixel_excluded']} anomalous image(s) without a mask: left out of the pixel metrics "
                    f"(image metrics only)")
    if r.get("subset"):
        rows.append(f"a subset of {r['dataset']}: {len(r['classes'])} of its {len(r['catalog_classes'])} classes "
                    f"(missing: {', '.join(r['classes_missing'])})")
    rows.append(f"{r['method']} on {r['dataset']}: {r['images']} images, {r['images_per_second']} images/s "
                f"(model), {r['seconds']} s total, world size {r['world_size']}")
    return "\n".join(rows)
