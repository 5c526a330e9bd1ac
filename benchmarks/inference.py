"""Inference images/s of every registered method on the tiny backbone (CPU or GPU).

Each method's ``-tiny`` config, the tiny CLIP resized to ``--size`` px, batches of ``--batch``
random images of two classes, ``predict`` under inference mode; zero-shot references are set up
first for few-shot methods. The figure is the median of ``--repeats`` timed batches after one
warm-up batch (the first batch also fills text-feature caches).

    python benchmarks/inference.py [--size 224] [--batch 16] [--repeats 5] [--methods clip winclip ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from zsadx.config import load_config, load_yaml
from zsadx.eval.evaluator import EvalConfig
from zsadx.models.methods import load_all
from zsadx.models.methods.base import build_method


def images_per_second(name: str, size: int, batch: int, repeats: int, device: str) -> float:
    data = {"method": load_yaml(f"methods/{name}-tiny"), "data": {"shards": "-", "dataset": "-"}}
    cfg = load_config(EvalConfig, data=data, overrides=[f"method.backbone.image_size={size}"]).method
    if cfg.input_size:
        cfg.input_size = size
    m = build_method(cfg).to(device).eval()
    classes = ["bottle", "screw"]
    refs = {c: torch.randn(max(cfg.shots, 1), 3, size, size, device=device) for c in classes} if cfg.shots else None
    m.prepare(classes, "industrial", refs)
    x = {"image": torch.randn(batch, 3, size, size, device=device), "cls": [classes[i % 2] for i in range(batch)],
         "dataset": ["mvtec-ad"] * batch, "domain": ["industrial"] * batch}
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.predict(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    names = args.methods or list(load_all().names())
    print(f"tiny backbone, {args.size} px, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads; reference: the plain CLIP baseline")
    rates = {n: images_per_second(n, args.size, args.batch, args.repeats, args.device) for n in names}
    ref = rates.get("clip")
    for n, r in rates.items():
        rel = f"{r / ref:6.2f}x clip" if ref else ""
        print(f"{n:14s} {r:9.1f} img/s  {rel}")


if __name__ == "__main__":
    main()
