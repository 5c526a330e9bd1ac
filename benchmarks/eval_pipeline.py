"""Where an evaluation spends its time, and whether overlapping the stages pays (issue 19 goal 4).

Synthetic shards (half anomalous, with masks) are evaluated by ``zsadx.eval.evaluate`` on the
tiny random CLIP: once with ``pipeline=false`` (model, then metrics, batch after batch) and once
overlapped (metrics in a background thread; loading in worker processes in both). Each stage is
also timed alone: the loader by a pass over the same DataLoader without the model, the model and
the metrics by the sequential run. The overlapped run should take no longer than the slowest
stage alone plus 15% (filling and draining the pipeline costs about one batch of each other
stage, so the more batches the closer). The machine is shared and noisy: ``--repeats`` rounds
each run the three one after the other, and the round with the median ratio is printed.

    python benchmarks/eval_pipeline.py [--images 480] [--size 224] [--eval-size 224] [--batch 8] [--workers 1]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from zsadx.config import load_config, load_yaml
from zsadx.data.drawing import sample, save, save_mask
from zsadx.data.records import Record, write_manifest
from zsadx.data.shards import write_shards
from zsadx.eval.evaluator import EvalConfig, evaluate

DATASET = "bench"
GOAL = 1.15  # overlapped end-to-end time / the slowest stage alone


def synthetic_shards(folder: Path, images: int, size: int, classes: int = 2, references: int = 2,
                     distinct: int = 32) -> Path:
    """``images`` test images of ``size`` px over ``classes`` classes, every other one anomalous with
    a mask, plus ``references`` normal train images per class (few-shot methods draw from them).
    Only ``distinct`` normal and as many anomalous pictures are drawn, then reused under new keys:
    drawing is slow, and the timings do not depend on what the pictures show; each is sharded
    (resized, PNG-encoded) as its own sample, with every core."""
    rng = np.random.default_rng(0)
    drawn: dict[tuple[bool, int], tuple[Path, Optional[Path]]] = {}
    records = []
    for i in range(images + classes * references):
        split = "test" if i < images else "train"
        anomalous = split == "test" and i % 2 == 1
        slot = (anomalous, (i // 2) % distinct)
        if slot not in drawn:
            img, mask = sample(size, size, rng, anomalous=anomalous)
            stem = folder / "raw" / f"{int(anomalous)}-{slot[1]:03d}"
            drawn[slot] = (save(stem.with_suffix(".png"), img),
                           save_mask(stem.with_name(stem.name + "_mask.png"), mask) if anomalous else None)
        image, mask_file = drawn[slot]
        records.append(Record(key=f"{split}/{i:05d}", image=str(image), label=int(anomalous),
                              cls=f"class{(i // 2) % classes}", dataset=DATASET, domain="industrial", split=split,
                              mask=str(mask_file) if mask_file else None, width=size, height=size))
    write_manifest(records, folder / "manifest.jsonl")
    write_shards(folder / "manifest.jsonl", folder / "shards", size=size, workers=os.cpu_count() or 1, progress=False)
    return folder / "shards"


def eval_config(shards: Path, out: Path, method: dict, overrides: list[str]) -> EvalConfig:
    data = {"method": method, "out_dir": str(out), "progress": False, "save_scores": True,
            "data": {"shards": str(shards), "dataset": DATASET}}
    return load_config(EvalConfig, data=data, overrides=overrides)


def tiny_method(name: str, size: int, eval_size: Optional[int] = None) -> dict:
    """The method's tiny config at ``size`` px; maps and masks at ``eval_size`` (default: ``size``)."""
    method = load_yaml(f"methods/{name}-tiny")
    method.setdefault("backbone", {})["image_size"] = size
    if method.get("input_size"):
        method["input_size"] = size
    if method.get("eval_size") or eval_size:
        method["eval_size"] = eval_size or size
    return method


def is_trained(method_name: str) -> bool:
    """Trained methods are benchmarked from their random start (untrained=true): same arithmetic."""
    from zsadx.models.methods import load_all

    return load_all().get(method_name).trained


def loader_alone(cfg: EvalConfig) -> float:
    """Seconds for the evaluation's own DataLoader to deliver every batch, with no model to wait for."""
    from torch.utils.data import DataLoader

    from zsadx.data.loaders import EvalShards
    from zsadx.data.transforms import EvalTransform

    size = cfg.method.input_size or cfg.method.backbone.image_size
    transform = EvalTransform(size=size, mask_resize=cfg.data.mask_resize, mask_size=cfg.method.eval_size or size)
    ds = EvalShards(cfg.data.shards, cfg.data.dataset, None, cfg.data.split, transform)
    t0 = time.perf_counter()
    for _ in DataLoader(ds, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers):
        pass
    return time.perf_counter() - t0


def stage_row(label: str, stages: dict, images: int) -> str:
    return (f"{label:22s} {stages['load']:8.2f} {stages['model']:8.2f} {stages['metrics']:8.2f} "
            f"{stages['total']:8.2f} {images / stages['total']:9.1f}")


def compare(shards: Path, out: Path, method: dict, overrides: list[str], repeats: int = 5) -> dict:
    """``repeats`` rounds of: the loader alone, the sequential and the overlapped evaluation, one
    after the other, so a noisy spell on the shared machine hits a round's runs alike. Each round
    gives a ratio (its overlapped time / its slowest stage alone); the round with the median ratio
    is printed. Returns {'rounds', 'median', 'ratios'}."""
    seq_cfg = eval_config(shards, out / "sequential", method, [*overrides, "pipeline=false"])
    cfg = eval_config(shards, out / "overlapped", method, [*overrides, "pipeline=true"])
    evaluate(seq_cfg)  # one-off costs (imports, first allocations) outside the rounds
    rounds = []
    for _ in range(repeats):
        loader = loader_alone(cfg)
        seq, piped = evaluate(seq_cfg), evaluate(cfg)
        alone = {"load": loader, "model": seq["stage_seconds"]["model"], "metrics": seq["stage_seconds"]["metrics"]}
        slowest = max(alone, key=alone.get)
        rounds.append({"alone": alone, "slowest": slowest, "sequential": seq, "overlapped": piped,
                       "ratio": piped["stage_seconds"]["total"] / alone[slowest]})
    ratios = sorted(r["ratio"] for r in rounds)
    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    alone, slowest, seq, piped = median["alone"], median["slowest"], median["sequential"], median["overlapped"]
    n = seq["images"]
    print(f"{'seconds':22s} {'load':>8s} {'model':>8s} {'metrics':>8s} {'total':>8s} {'images/s':>9s}")
    print(f"{'each stage alone':22s} {alone['load']:8.2f} {alone['model']:8.2f} {alone['metrics']:8.2f} {'':8s} "
          f"{n / alone[slowest]:9.1f}   <- bound: the slowest stage ({slowest})")
    print(stage_row("sequential", seq["stage_seconds"], n))
    print(stage_row("overlapped", piped["stage_seconds"], n))
    print(f"(the round with the median ratio of {repeats}; every round runs the three one after the other)")
    print(f"overlapped end-to-end / slowest stage alone: {median['ratio']:.2f} (goal <= {GOAL:.2f}; rounds "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}); speed-up over sequential "
          f"{seq['stage_seconds']['total'] / piped['stage_seconds']['total']:.2f}x")
    same = all(json.dumps(r["sequential"]["per_class"], sort_keys=True) ==
               json.dumps(r["overlapped"]["per_class"], sort_keys=True) for r in rounds)
    print(f"same metrics in both, every round: {same}")
    return {"rounds": rounds, "median": median, "ratios": ratios}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--eval-size", type=int, default=None,
                   help="maps and masks at this size (default: --size); larger weighs on the metrics")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model stage")
    p.add_argument("--method", default="clip")
    p.add_argument("--repeats", type=int, default=5, help="rounds (loader alone, sequential, overlapped); the median is shown")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = synthetic_shards(tmp / "data", args.images, args.size)
        print(f"{args.method}-tiny on {args.images} synthetic {args.size} px images (half with masks, metrics at "
              f"{args.eval_size or args.size} px), batch "
              f"{args.batch}, {args.workers} loader worker(s), {args.threads} model thread(s), "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
        method = tiny_method(args.method, args.size, args.eval_size)
        overrides = [f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                     f"untrained={str(is_trained(method['name'])).lower()}"]
        compare(shards, tmp / "out", method, overrides, args.repeats)


if __name__ == "__main__":
    main()
