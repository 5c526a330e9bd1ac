"""Sharding throughput: images/s of `zsadx data shard` for 1 and N encode workers.

MVTec-like native images (default 900 px PNG, half anomalous with masks) resized to 518 px and
written as PNG shards, the default `zsadx data shard` settings. Each worker count writes into
its own fresh folder; the folders are then compared byte for byte (the output must not depend
on the worker count).

    python benchmarks/shard.py [--images 200] [--native 900] [--workers 1 2] [--format png]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import make_set  # noqa: E402  (the loader benchmark's synthetic set)

from zsadx.data.records import write_manifest  # noqa: E402
from zsadx.data.shards import write_shards  # noqa: E402


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--native", type=int, default=900)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--format", default="png")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPU cores; {args.images} images {args.native}px -> {args.size}px {args.format}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recs = make_set(tmp / "raw", args.images, args.native)
        write_manifest(recs, tmp / "manifest.jsonl")
        rates, trees = {}, {}
        for w in args.workers:
            t0 = time.perf_counter()
            write_shards(tmp / "manifest.jsonl", tmp / f"s{w}", size=args.size, fmt=args.format, workers=w,
                         progress=False)
            rates[w] = args.images / (time.perf_counter() - t0)
            trees[w] = tree(tmp / f"s{w}")
        base = args.workers[0]
        print(f"\n{'workers':>8s} {'images/s':>10s} {'speed-up':>9s} {'same bytes':>11s}")
        for w in args.workers:
            print(f"{w:8d} {rates[w]:10.1f} {rates[w] / rates[base]:8.2f}x {str(trees[w] == trees[base]):>11s}")


if __name__ == "__main__":
    main()
