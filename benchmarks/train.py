"""Training samples/s of tiny AnomalyCLIP on CPU: 1 process vs 2 processes (accelerate launch, DDP/gloo).

Both runs see the same global batch (``--global-batch``; 2 processes take half each), the same
synthetic MVTec-style shards and the same number of optimizer steps. Throughput is read from the
trainer's own log (``samples_per_second`` per logging window), leaving out the first window, which
holds start-up. The 1-process figure is the reference the 2-process one is compared to.

    python benchmarks/train.py [--steps 60] [--global-batch 8] [--image-size 224] [--method anomalyclip]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_shards(root: Path) -> Path:
    from zsadx.data.convert import convert
    from zsadx.data.shards import write_shards
    from zsadx.data.synthetic import make_raw

    make_raw("mvtec-ad", root / "raw", seed=0, n=2)
    convert("mvtec-ad", root / "raw", root / "manifest", progress=False)
    write_shards(root / "manifest" / "manifest.jsonl", root / "shards", size=256, progress=False)
    return root / "shards"


def run(nproc: int, shards: Path, out: Path, args) -> dict:
    train_args = ["--config", f"train/{args.method}-tiny", f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]",
                  f"out_dir={out}", "progress=false", "log_every=10", f"max_steps={args.steps}", "epochs=1000",
                  f"data.batch_size={args.global_batch // nproc}", f"method.backbone.image_size={args.image_size}",
                  "data.num_workers=1"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "zsadx.train", *train_args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/ddp-cpu-2.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(port), "-m", "zsadx.train", *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // nproc)), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{nproc}-process run failed:\n{proc.stderr[-4000:]}")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_second"] for r in log[1:]]
    return {"samples_per_second": statistics.median(rates), "wall_seconds": wall, "final_loss": log[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--method", default="anomalyclip")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads shared by the processes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp)
        one = run(1, shards, tmp / "one", args)
        two = run(2, shards, tmp / "two", args)
    print(f"tiny {args.method}, {args.image_size} px, global batch {args.global_batch}, {args.steps} steps, "
          f"{args.threads} CPU threads shared")
    print(f"{'':24s} {'samples/s':>10s} {'wall s':>8s} {'final loss':>11s}")
    for name, r in [("1 process (reference)", one), ("2 processes (DDP/gloo)", two)]:
        print(f"{name:24s} {r['samples_per_second']:10.1f} {r['wall_seconds']:8.1f} {r['final_loss']:11.4f}")
    print(f"2 vs 1 process: {two['samples_per_second'] / one['samples_per_second']:.2f}x samples/s "
          f"(same global batches; final losses agree to {abs(one['final_loss'] - two['final_loss']):.1e})")


if __name__ == "__main__":
    main()
