"""The full pixel metric suite of zsadx vs the seeds' anchors, on one class-sized synthetic set.

200 images at 518 x 518 with smooth maps and blob anomalies (half of the images anomalous).
Each contender runs in its own process (so its peak RSS is its own) on the same data:

* zsadx: pixel AUROC + AP + F1-max + AUPRO, fed in batches of 16 as an evaluator would;
* scikit-learn ``roc_auc_score`` and ``average_precision_score`` on the pooled pixels;
* anomalib's ``AUPRO`` (exact, one sort) -- from a separate environment, never a zsadx
  dependency: pass ``--anomalib-python /path/to/venv/bin/python`` (see ``make bench-metrics``).

    python benchmarks/metrics.py [--images 200] [--size 518] [--anomalib-python PY]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(folder: Path, n: int, size: int, seed: int = 0) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    maps = np.lib.format.open_memmap(folder / "maps.npy", "w+", np.float32, (n, size, size))
    masks = np.lib.format.open_memmap(folder / "masks.npy", "w+", np.uint8, (n, size, size))
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        m = np.zeros((size, size), bool)
        if i % 2:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(40, size - 40, 2)
                ry, rx = rng.integers(6, 40, 2)
                m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        noise = ndimage.gaussian_filter(rng.random((-(-size // 8), -(-size // 8))).astype(np.float32), 1)
        base = np.kron(noise, np.ones((8, 8), np.float32))[:size, :size]
        amap = base + 0.35 * ndimage.gaussian_filter(m.astype(np.float32), 6) * rng.uniform(0.3, 1.5)
        maps[i] = ndimage.gaussian_filter(amap, 4)
        masks[i] = m
    maps.flush()
    masks.flush()


def run_zsadx(folder: str) -> dict:
    from zsadx.eval.metrics import ClassMetrics

    maps = np.load(f"{folder}/maps.npy", mmap_mode="r")
    masks = np.load(f"{folder}/masks.npy", mmap_mode="r")
    t0 = time.perf_counter()
    acc = ClassMetrics("bench")
    for lo in range(0, len(maps), 16):
        m, g = np.asarray(maps[lo:lo + 16]), np.asarray(masks[lo:lo + 16]).astype(bool)
        acc.add(m.reshape(len(m), -1).max(1), g.reshape(len(g), -1).any(1), m, g)
    px = acc.pixel_metrics()
    return {"seconds": time.perf_counter() - t0, "pixel_auroc": px.auroc, "pixel_ap": px.ap,
            "pixel_f1_max": px.f1_max, "pixel_aupro": px.aupro}


def run_sklearn(folder: str, which: str) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.load(f"{folder}/masks.npy").ravel()
    s = np.load(f"{folder}/maps.npy").ravel()
    t0 = time.perf_counter()
    v = roc_auc_score(y, s) if which == "auroc" else average_precision_score(y, s)
    return {"seconds": time.perf_counter() - t0, f"pixel_{which}": float(v)}


def run_anomalib(folder: str) -> dict:
    import torch
    # The torchmetrics class behind anomalib.metrics.AUPRO (the wrapper only adds batch-field plumbing).
    from anomalib.metrics.aupro import _AUPRO as AUPRO

    maps = torch.from_numpy(np.load(f"{folder}/maps.npy"))
    masks = torch.from_numpy(np.load(f"{folder}/masks.npy"))
    t0 = time.perf_counter()
    metric = AUPRO(fpr_limit=0.3)
    metric.update(maps, masks)
    v = float(metric.compute())
    return {"seconds": time.perf_counter() - t0, "pixel_aupro": v}


def child(args: list[str], python: str = sys.executable) -> dict:
    cmd = [python, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--anomalib-python", default=None)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, folder = args.child[0], args.child[1]
        out = {"zsadx": lambda: run_zsadx(folder), "sk_auroc": lambda: run_sklearn(folder, "auroc"),
               "sk_ap": lambda: run_sklearn(folder, "ap"), "anomalib": lambda: run_anomalib(folder)}[kind]()
        out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_data(Path(tmp), args.images, args.size)
        n_px = args.images * args.size * args.size
        print(f"{args.images} images at {args.size}px = {n_px / 1e6:.1f} M pixels (made in {time.perf_counter() - t0:.0f}s)")
        z = child(["zsadx", tmp])
        anchors = {"sklearn roc_auc_score": child(["sk_auroc", tmp]),
                   "sklearn average_precision_score": child(["sk_ap", tmp])}
        if args.anomalib_python:
            anchors["anomalib AUPRO"] = child(["anomalib", tmp], python=args.anomalib_python)
    print(f"\n{'contender':34s} {'seconds':>8s} {'peak GB':>8s}  value (zsadx value)")
    key = {"sklearn roc_auc_score": "pixel_auroc", "sklearn average_precision_score": "pixel_ap",
           "anomalib AUPRO": "pixel_aupro"}
    for name, r in anchors.items():
        k = key[name]
        print(f"{name:34s} {r['seconds']:8.2f} {r['peak_gb']:8.2f}  {r[k]:.8f} ({z[k]:.8f}, "
              f"diff {abs(r[k] - z[k]):.1e})")
    total = sum(r["seconds"] for r in anchors.values())
    print(f"{'anchors together':34s} {total:8.2f} {max(r['peak_gb'] for r in anchors.values()):8.2f}")
    print(f"{'zsadx AUROC+AP+F1-max+AUPRO':34s} {z['seconds']:8.2f} {z['peak_gb']:8.2f}  "
          f"F1-max {z['pixel_f1_max']:.6f}")
    print(f"{'speed-up (target >= 20x)':34s} {total / z['seconds']:8.1f}x")


if __name__ == "__main__":
    main()
