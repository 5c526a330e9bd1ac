"""Decoded, transformed 518 px images/s: zsadx shards vs a seed-style folder-of-PNG loader.

The folder loader does what the seeds' datasets do per item: PIL open, convert RGB, bicubic resize
to 518, ToTensor + normalise, mask open + resize; read through a torch DataLoader with the same
worker count. The shards hold the same images pre-resized to 518 (PNG, lossless) and are read by
``EvalShards``. Images are synthetic at MVTec-like native size (default 900 px), half anomalous.

    python benchmarks/data.py [--images 200] [--native 900] [--workers 2] [--format png]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from zsadx.data.loaders import EvalShards
from zsadx.data.records import Record, write_manifest
from zsadx.data.shards import write_shards
from zsadx.data.synthetic import sample, save, save_mask
from zsadx.data.transforms import EvalTransform


class FolderLoader(Dataset):
    """The seeds' per-file path: decode the full-size PNG and resize on every read."""

    def __init__(self, records: list[Record], size: int = 518):
        self.records, self.t = records, EvalTransform(size=size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        with Image.open(r.image) as im:
            image = self.t.image(im)
        mask = self.t.mask(Image.open(r.mask)) if r.mask else self.t.mask(None)
        return {"image": image, "mask": mask, "label": r.label}


def make_set(folder: Path, n: int, native: int) -> list[Record]:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        img, mask = sample(native, native, rng, anomalous=i % 2 == 1)
        p = save(folder / f"{i:04d}.png", img)
        m = save_mask(folder / f"{i:04d}_mask.png", mask) if i % 2 else None
        recs.append(Record(key=f"{i:04d}", image=str(p), label=i % 2, cls="bench", dataset="bench",
                           domain="industrial", split="test", mask=str(m) if m else None, width=native,
                           height=native))
    return recs


def rate(loader) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--native", type=int, default=900)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--format", default="png", choices=["png", "webp", "jpg"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        recs = make_set(tmp / "raw", args.images, args.native)
        print(f"generated {args.images} images at {args.native}px in {time.perf_counter() - t0:.1f}s")
        write_manifest(recs, tmp / "manifest.jsonl")
        t0 = time.perf_counter()
        index = write_shards(tmp / "manifest.jsonl", tmp / "shards", size=args.size, fmt=args.format,
                             workers=args.workers, progress=False)
        print(f"sharded in {time.perf_counter() - t0:.1f}s: {index['bytes'] / 1e6:.1f} MB "
              f"({index['bytes'] / args.images / 1e3:.0f} KB/image, {args.format})")
        folder = DataLoader(FolderLoader(recs, args.size), batch_size=16, num_workers=args.workers)
        shards = DataLoader(EvalShards(tmp / "shards", transform=EvalTransform(size=args.size)), batch_size=16,
                            num_workers=args.workers)
        rate(folder)  # warm the page cache so both read from memory
        f_rate, fn = rate(folder)
        s_rate, sn = rate(shards)
        assert fn == sn == args.images
        print(f"\n{'loader':32s} {'images/s':>10s}")
        print(f"{'folder of PNG (seed-style)':32s} {f_rate:10.1f}")
        print(f"{'zsadx shards (' + args.format + ', ' + str(args.size) + 'px)':32s} {s_rate:10.1f}")
        print(f"{'ratio (target >= 2.0)':32s} {s_rate / f_rate:10.2f}x")


if __name__ == "__main__":
    main()
