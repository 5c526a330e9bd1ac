"""``zsadx demo``: the main job on the embedded default (tiny CLIP, synthetic data, local executor).

A whole study in miniature: synthetic downloads of industrial and medical datasets in their real
raw layouts -> manifests -> shards -> the demo grid (``configs/grids/demo.yaml``: a training-free
method zero-shot, one few-shot, one trained method under the papers' protocol) fanned out with
submitit's local executor -> the paper-style results table (also written as ``table.md`` and a
bar chart ``table.png``). Re-running it skips every finished cell.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from zsadx.config import load_config, save_resolved
from zsadx.files import atomic_write_json, atomic_write_text


@dataclasses.dataclass
class DemoConfig:
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["mvtec-ad", "visa", "bmad-brain"])
    grid: str = "grids/demo"
    grid_overrides: list[str] = dataclasses.field(default_factory=list)
    method_overrides: list[str] = dataclasses.field(default_factory=list)  # of every method (backbone.*, method.*)
    images_per_group: int = 2
    image_size: int = 128
    out_dir: str = "runs/demo"
    seed: int = 0


METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


def make_data(cfg: DemoConfig, out: Path) -> dict:
    from zsadx.data.convert import convert
    from zsadx.data.shards import load_index, write_shards
    from zsadx.data.synthetic import make_raw

    if (out / "shards" / "index.json").is_file():
        return load_index(out / "shards")
    manifests = []
    for name in cfg.datasets:
        make_raw(name, out / "raw" / name, seed=cfg.seed, n=cfg.images_per_group)
        convert(name, out / "raw" / name, out / "manifests" / name, progress=False)
        manifests.append((out / "manifests" / name / "manifest.jsonl").read_text())
    atomic_write_text(out / "manifest.jsonl", "".join(manifests))
    return write_shards(out / "manifest.jsonl", out / "shards", size=cfg.image_size, progress=False)


def demo_grid(cfg: DemoConfig):
    """The demo's grid: its shards and out_dir under the demo's, the demo's seed, and the method
    overrides applied to every method (so ``backbone.image_size=320`` reaches each of them)."""
    from launch.grid import load_grid

    out = Path(cfg.out_dir)
    grid = load_grid(cfg.grid, [f"shards={out / 'shards'}", f"out_dir={out / 'grid'}", f"seeds=[{cfg.seed}]",
                                *cfg.grid_overrides])
    for m in grid.methods:
        m.overrides = [*m.overrides, *cfg.method_overrides]
    return grid


def run(cfg: DemoConfig, log=print) -> dict:
    from launch import fanout
    from launch.grid import expand
    from zsadx.eval import tables

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    grid = demo_grid(cfg)
    plan = expand(grid)  # a bad override fails here, before any data is made
    save_resolved(cfg, out)
    index = make_data(cfg, out)
    t_data = time.perf_counter() - t0
    log(f"data ready ({index['samples']} samples, {t_data:.1f} s); grid: {len(plan.train)} training and "
        f"{len(plan.evals)} evaluation cells on the {grid.cluster} executor")
    summary = fanout.run(plan, log=log)
    labels = list(dict.fromkeys(c.method for c in plan.evals))  # columns in the grid's order
    table = tables.build(tables.collect(out / "grid"), METRICS, columns=labels)
    text = tables.render(table, "md")
    atomic_write_text(out / "table.md", text)
    tables.plot(table, out / "table.png")
    submitted = {k: summary[k] for k in ("train", "eval", "jobs")}
    result = {"samples": index["samples"], "data_seconds": round(t_data, 2), "submitted": submitted,
              "failed": summary["failed"],
              "table": json.loads(tables.render(table, "json")), "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(out / "result.json", result, indent=2)
    return {**result, "markdown": text}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (synthetic data, tiny CLIP)")
    p.add_argument("--config", default="demo", help="demo config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out_dir=/tmp/demo seed=3; backbone.* and "
                   "method.* go to every method of the grid, e.g. backbone.image_size=320")
    p.set_defaults(func=_main)


# Overrides with these prefixes go to every method of the grid, the others to DemoConfig.
METHOD_PREFIXES = ("backbone.", "method.")


def load_demo_config(path: str, overrides: list[str]) -> DemoConfig:
    """DemoConfig with ``backbone.x=v`` / ``method.x=v`` overrides moved to ``method_overrides``."""
    method = [o.removeprefix("method.") for o in overrides if o.startswith(METHOD_PREFIXES)]
    cfg = load_config(DemoConfig, path, [o for o in overrides if not o.startswith(METHOD_PREFIXES)])
    cfg.method_overrides = [*cfg.method_overrides, *method]
    return cfg


def _main(args: argparse.Namespace) -> int:
    cfg = load_demo_config(args.config, args.overrides)
    result = run(cfg)
    print(result["markdown"])
    print(f"(tiny random CLIP, synthetic data: the numbers show the pipeline works, not method quality; "
          f"{result['seconds']} s)\noutputs in {cfg.out_dir}: table.md, table.png, grid/")
    if result["failed"]:
        print(f"{len(result['failed'])} cell(s) did not finish (see above, or `zsadx grid status {cfg.grid} "
              f"out_dir={cfg.out_dir}/grid shards={cfg.out_dir}/shards`)")
    return 1 if result["failed"] else 0
