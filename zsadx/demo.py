"""``zsadx demo``: the main job on the embedded default (tiny CLIP, synthetic data).

It grows with the package. Today it runs the whole evaluation path: synthetic downloads of an
industrial and a medical dataset in their real raw layouts -> manifests -> shards -> the
evaluator, for each configured method (WinCLIP zero-shot and FADE one-shot by default), and prints
a results table. Resolved configs, results files and overlays land in ``out_dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from zsadx.config import load_config, load_yaml, save_resolved


@dataclasses.dataclass
class DemoMethod:
    config: str = "methods/winclip-tiny"
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DemoConfig:
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["mvtec-ad", "bmad-brain"])
    methods: list[DemoMethod] = dataclasses.field(default_factory=lambda: [DemoMethod()])
    images_per_group: int = 2
    image_size: int = 128
    out_dir: str = "runs/demo"
    seed: int = 0


METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


def run(cfg: DemoConfig) -> dict:
    from zsadx.data.convert import convert
    from zsadx.data.shards import write_shards
    from zsadx.data.synthetic import make_raw
    from zsadx.eval.evaluator import EvalConfig, evaluate

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    save_resolved(cfg, out)
    manifests = []
    for name in cfg.datasets:
        make_raw(name, out / "raw" / name, seed=cfg.seed, n=cfg.images_per_group)
        convert(name, out / "raw" / name, out / "manifests" / name, progress=False)
        manifests.append((out / "manifests" / name / "manifest.jsonl").read_text())
    (out / "manifest.jsonl").write_text("".join(manifests))
    index = write_shards(out / "manifest.jsonl", out / "shards", size=cfg.image_size, progress=False)
    t_data = time.perf_counter() - t0
    table = []
    for m in cfg.methods:
        for name in cfg.datasets:
            data = {"method": load_yaml(m.config), "out_dir": str(out / "results"), "save_overlays": 2,
                    "data": {"shards": str(out / "shards"), "dataset": name, "num_workers": 0, "batch_size": 16}}
            ecfg = load_config(EvalConfig, data=data, overrides=m.overrides)
            r = evaluate(ecfg)
            label = ecfg.method.name + (f" {ecfg.method.shots}-shot" if ecfg.method.shots else " 0-shot")
            table.append({"method": label, "dataset": name, **{k: r["mean"].get(k) for k in METRICS},
                          "images_per_second": r["images_per_second"]})
    result = {"shards": index["samples"], "data_seconds": round(t_data, 2), "table": table,
              "seconds": round(time.perf_counter() - t0, 2)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    fmt = lambda v: f"{100 * v:8.1f}" if v is not None and not math.isnan(v) else f"{'n/a':>8s}"
    lines = [f"{'method':18s} {'dataset':12s} " + " ".join(f"{k:>12s}" for k in METRICS) + f" {'img/s':>7s}"]
    for row in result["table"]:
        lines.append(f"{row['method']:18s} {row['dataset']:12s} " + " ".join(f"{fmt(row[k]):>12s}" for k in METRICS)
                     + f" {row['images_per_second']:7.1f}")
    lines.append(f"(tiny random CLIP, synthetic data: the numbers show the pipeline works, not method quality; "
                 f"{result['seconds']} s)")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (synthetic data, tiny CLIP)")
    p.add_argument("--config", default="demo", help="demo config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out_dir=/tmp/demo seed=3")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(DemoConfig, args.config, args.overrides)
    result = run(cfg)
    print(format_table(result))
    print(f"outputs in {cfg.out_dir}")
    return 0
