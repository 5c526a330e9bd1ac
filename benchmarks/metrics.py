"""The full metric suite of zsadx vs the anchors, on one class-sized synthetic set, side by side.

200 images at 518 x 518 with smooth maps and blob anomalies (half of the images anomalous).
Each contender runs in its own process (so its peak RSS is its own) on the same saved data, read
batch by batch from the files (no memory map: the peak is the contender's, not the page cache's):

* zsadx: image + pixel AUROC, AP, F1-max and AUPRO (exact), fed in batches of 16 as the evaluator
  does; ``--device cuda`` also runs the device path (state and reduction on the GPU);
* ADEval 1.1.0's ``EvalAccumulator`` (binned, 1000 strips; image + pixel AUROC, AUPR, AUPRO), fed
  the same batches -- from its own environment: ``--adeval-python /path/to/venv/bin/python``. It
  needs the score bounds up front; it is given the data's true minimum and maximum, found before
  its clock starts (the most favourable setting for it);
* scikit-learn ``roc_auc_score`` and ``average_precision_score`` on the pooled pixels (``--sklearn``:
  a minute each; the tests hold zsadx equal to them);
* anomalib's ``AUPRO`` (exact, one sort) -- ``--anomalib-python PY``;
* ``--zsadx-src DIR``: another zsadx source tree (e.g. ``git archive <rev> zsadx | tar -x -C DIR``)
  as a second zsadx contender, for before/after figures.

    python benchmarks/metrics.py [--images 200] [--size 518] [--adeval-python PY] [--anomalib-python PY]
                                 [--sklearn] [--device cuda] [--zsadx-src DIR] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BATCH = 16


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


def batches(folder: str):
    """(maps, masks, image scores, image labels) per batch of BATCH images, read from the .npy files."""
    files = {}
    for name in ("maps", "masks"):
        f = open(f"{folder}/{name}.npy", "rb")
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
        shape, _, dtype = read_header(f)
        files[name] = (f, shape, dtype)
    n, h, w = files["maps"][1]
    try:
        for lo in range(0, n, BATCH):
            b = min(BATCH, n - lo)
            m, g = (np.fromfile(f, dtype, b * h * w).reshape(b, h, w) for f, _, dtype in files.values())
            yield m, g, m.reshape(b, -1).max(1), g.reshape(b, -1).any(1)
    finally:
        for f, _, _ in files.values():
            f.close()


class Clock:
    """Wall and CPU seconds per phase. On a shared machine the CPU seconds are the steadier figure:
    wall time also counts the time other processes held the core."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    @contextmanager
    def __call__(self, phase: str):
        w, c = time.perf_counter(), time.process_time()
        yield
        self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - w
        self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - c

    def figures(self) -> dict:
        return {"seconds": sum(self.wall.values()), "cpu_seconds": sum(self.cpu.values()),
                **{f"{k}_seconds": v for k, v in self.wall.items()}, **{f"{k}_cpu": v for k, v in self.cpu.items()}}


def warm_up() -> None:
    """Libraries imported before the clock starts, as ADEval's are (its import loads cv2)."""
    from zsadx.eval.metrics import label_regions

    label_regions(np.zeros((2, 2), bool))  # scipy.ndimage


def run_zsadx(folder: str, device: str | None = None) -> dict:
    from zsadx.eval.metrics import ClassMetrics

    if device:
        import torch

        def sync():
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()

        def put(x):
            return torch.from_numpy(x).to(device)
    else:
        def sync():
            pass

        def put(x):
            return x
    clock = Clock()
    n, h, w = np.load(f"{folder}/maps.npy", mmap_mode="r").shape  # the header only
    try:  # the pixel count, as the evaluator gives it from the index
        acc = ClassMetrics("bench", device=device, expected_pixels=n * h * w)
    except TypeError:  # an older zsadx tree (--zsadx-src): no size hint, perhaps no device
        acc = ClassMetrics("bench", device=device) if device else ClassMetrics("bench")
    warm_up()
    for m, g, s, y in batches(folder):
        m = put(m)  # as the evaluator hands over the model's maps: already on the device
        sync()
        with clock("add"):
            acc.add(s, y, m, g)
            sync()
    with clock("compute"):
        out = acc.compute()
    return {**clock.figures(), **out}


def run_adeval(folder: str) -> dict:
    if not hasattr(np, "trapz"):  # ADEval 1.1.0 calls np.trapz, which numpy 2 removed: shim it here only
        np.trapz = np.trapezoid
    from adeval import EvalAccumulator

    lo, hi = np.inf, -np.inf
    for m, _, _, _ in batches(folder):  # the bounds ADEval asks for, before its clock starts
        lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    clock = Clock()
    acc = EvalAccumulator(lo, hi, lo, hi)
    for m, g, s, y in batches(folder):
        with clock("add"):
            acc.add_image(s, y)
            acc.add_anomap_batch(m, g)
    with clock("compute"):
        r = acc.summary()
    return {**clock.figures(), "image_auroc": r["i_auroc"], "image_ap": r["i_aupr"], "pixel_auroc": r["p_auroc"],
            "pixel_ap": r["p_aupr"], "pixel_aupro": float(r["p_aupro"])}


def run_sklearn(folder: str, which: str) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.load(f"{folder}/masks.npy").ravel()
    s = np.load(f"{folder}/maps.npy").ravel()
    clock = Clock()
    with clock("all"):
        v = roc_auc_score(y, s) if which == "auroc" else average_precision_score(y, s)
    return {**clock.figures(), f"pixel_{which}": float(v)}


def run_anomalib(folder: str) -> dict:
    import torch
    # The torchmetrics class behind anomalib.metrics.AUPRO (the wrapper only adds batch-field plumbing).
    from anomalib.metrics.aupro import _AUPRO as AUPRO

    maps = torch.from_numpy(np.load(f"{folder}/maps.npy"))
    masks = torch.from_numpy(np.load(f"{folder}/masks.npy"))
    clock = Clock()
    with clock("all"):
        metric = AUPRO(fpr_limit=0.3)
        metric.update(maps, masks)
        v = float(metric.compute())
    return {**clock.figures(), "pixel_aupro": v}


def peak_gb() -> float:
    """This process's own peak resident memory. Not ``ru_maxrss``: Linux carries the peak of the
    process image an exec replaced into it, so a child spawned by this (data-holding) parent
    reported the parent's 0.32 GB as its own. ``VmHWM`` belongs to the new address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def median_round(runs: list[dict]) -> dict:
    """The round with the median CPU time (its own figures together, not a mix of rounds)."""
    return sorted(runs, key=lambda r: r["cpu_seconds"])[len(runs) // 2]


def child(args: list[str], python: str = sys.executable, src: str | None = None) -> dict:
    cmd = [python, __file__, "--child", *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SUITE = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def print_suite(rows: dict[str, dict], exact: dict) -> None:
    """Time, peak memory and every value next to its difference from zsadx's exact one."""
    print(f"\n{'contender':34s} {'wall s':>7s} {'cpu s':>7s} {'(add':>7s} {'compute)':>9s} {'peak GB':>8s}")
    for name, r in rows.items():
        cpu = f"{r['cpu_seconds']:7.2f}" if "cpu_seconds" in r else " " * 7
        split = f"{r['add_cpu']:7.2f} {r['compute_cpu']:9.2f}" if "add_cpu" in r else " " * 17
        print(f"{name:34s} {r['seconds']:7.2f} {cpu} {split} {r['peak_gb']:8.2f}")
    print("(add / compute: CPU seconds of feeding the batches / of the final reduction)")
    print(f"\n{'value':14s} {'zsadx (exact)':>14s}" + "".join(f" {n[:22]:>24s}" for n in rows if n != "zsadx"))
    for k in SUITE:
        cells = "".join(f" {r[k]:.8f} ({abs(r[k] - exact[k]):.0e})" if k in r else f" {'-':>24s}"
                        for n, r in rows.items() if n != "zsadx")
        print(f"{k:14s} {exact[k]:14.8f}{cells}")
    print("(ADEval's pixel_ap / image_ap is its trapezoidal AUPR, not the step-wise AP; it has no F1-max)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--adeval-python", default=None)
    ap.add_argument("--anomalib-python", default=None)
    ap.add_argument("--zsadx-src", default=None, help="another zsadx source tree, run as 'zsadx (other)'")
    ap.add_argument("--sklearn", action="store_true", help="also time scikit-learn on the pooled pixels (slow)")
    ap.add_argument("--device", default=None, help="also run zsadx with its state on this torch device")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved runs of zsadx and ADEval; the median is shown")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, folder = args.child[0], args.child[1]
        out = {"zsadx": lambda: run_zsadx(folder), "zsadx-device": lambda: run_zsadx(folder, args.child[2]),
               "adeval": lambda: run_adeval(folder), "sk_auroc": lambda: run_sklearn(folder, "auroc"),
               "sk_ap": lambda: run_sklearn(folder, "ap"), "anomalib": lambda: run_anomalib(folder)}[kind]()
        out["peak_gb"] = peak_gb()
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_data(Path(tmp), args.images, args.size)
        n_px = args.images * args.size * args.size
        print(f"{args.images} images at {args.size}px = {n_px / 1e6:.1f} M pixels (made in {time.perf_counter() - t0:.0f}s); "
              f"one process per contender, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
        # The fast contenders run --rounds times, interleaved, so a noisy spell on the shared
        # machine hits both sides alike; each prints its median round, the ratio's range is kept.
        fast = {"zsadx": (["zsadx", tmp], sys.executable, None)}
        if args.device:
            fast[f"zsadx on {args.device}"] = (["zsadx-device", tmp, args.device], sys.executable, None)
        if args.zsadx_src:
            fast["zsadx (other)"] = (["zsadx", tmp], sys.executable, args.zsadx_src)
        if args.adeval_python:
            fast["ADEval 1.1.0 EvalAccumulator"] = (["adeval", tmp], args.adeval_python, None)
        rounds = {name: [] for name in fast}
        for _ in range(args.rounds):
            for name, (argv, python, src) in fast.items():
                rounds[name].append(child(argv, python=python, src=src))
        rows = {name: median_round(runs) for name, runs in rounds.items()}
        if args.sklearn:
            rows["sklearn roc_auc_score"] = child(["sk_auroc", tmp])
            rows["sklearn average_precision_score"] = child(["sk_ap", tmp])
        if args.anomalib_python:
            rows["anomalib AUPRO"] = child(["anomalib", tmp], python=args.anomalib_python)
    print_suite(rows, rows["zsadx"])
    z = rows["zsadx"]
    print(f"(median of {args.rounds} interleaved rounds per contender above the sklearn / anomalib rows)")
    for name in ("ADEval 1.1.0 EvalAccumulator", "zsadx (other)"):
        if name in rows:
            r = rows[name]
            ratios = sorted(a["cpu_seconds"] / b["cpu_seconds"] for a, b in zip(rounds[name], rounds["zsadx"]))
            print(f"zsadx vs {name}: {r['cpu_seconds'] / z['cpu_seconds']:.2f}x faster in CPU time "
                  f"(rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x), {r['seconds'] / z['seconds']:.2f}x in wall time "
                  f"(target >= 1x, stretch 2x); peak {z['peak_gb']:.2f} vs {r['peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
