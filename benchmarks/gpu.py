"""A GPU node's time per method (issue 19 goal 6): images/s, peak memory, and the share of the
evaluation's wall time spent waiting for the loader, in the model, and in the metrics.

Every method with its own backbone and size but random weights (``backbone.pretrained=null``: no
download): ViT-L-14-336 at 518 px for the CLIP baseline, AnomalyCLIP, AdaCLIP, ACD-CLIP and
FAPrompt; WinCLIP and FADE keep their ViT-B-16-plus-240 at their own sizes. Two settings each:

* ``bf16 best``: autocast bf16, attention through torch's scaled_dot_product_attention (open_clip's
  blocks; the flash / memory-efficient kernels where the inputs allow), at the batch size with the
  most images/s in a sweep over the model stage alone (1, 2, 4, ... until memory runs out or the
  rate stops growing by 5%);
* ``fp32 b1``: fp32, batch 1, the official scripts' setting.

Both run ``zsadx.eval.evaluate`` end to end (overlapped pipeline, loader workers) on synthetic
518 px shards. Load and model shares are of the loop's wall time; the metrics run beside the model
in their own thread, so the three need not add up to 100%. On CUDA, timings synchronise the device
and the peak is ``torch.cuda.max_memory_allocated`` (weights included).

    python benchmarks/gpu.py [--images 512] [--methods anomalyclip adaclip ...] [--max-batch 128] [--json out.json]
    python benchmarks/gpu.py --smoke     # CPU, the tiny CLIP at 64 px, a few images: the CI check
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_pipeline import eval_config, is_trained, synthetic_shards, tiny_method  # noqa: E402

from zsadx.config import load_config, load_yaml  # noqa: E402
from zsadx.eval.evaluator import EvalConfig, evaluate, score_batch  # noqa: E402
from zsadx.eval.metrics import ClassMetrics  # noqa: E402
from zsadx.models.methods import load_all  # noqa: E402
from zsadx.models.methods.base import build_method  # noqa: E402

METHODS = ["clip", "anomalyclip", "adaclip", "acdclip", "faprompt", "winclip", "fade"]
GROWTH = 1.05  # a larger batch must give 5% more images/s to be worth its memory


@dataclass
class Row:
    method: str
    backbone: str
    size: int
    setting: str
    batch: int
    images_per_second: float
    peak_gib: Optional[float]
    load_share: float
    model_share: float
    metrics_share: float


def method_config(name: str, smoke: bool) -> dict:
    """The method's own config with random backbone weights; the tiny CLIP at 64 px in smoke mode."""
    if smoke:
        return tiny_method(name, 64)
    method = load_yaml(f"methods/{name}")
    method.setdefault("backbone", {})["pretrained"] = None
    return method


def resolved(method: dict) -> EvalConfig:
    return load_config(EvalConfig, data={"method": method, "data": {"shards": "-", "dataset": "-"}})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepared_method(method: dict, device: torch.device):
    """The method built on ``device`` and prepared for two classes (random references if few-shot)."""
    cfg = resolved(method)
    m = build_method(cfg.method).to(device).eval()
    size = cfg.method.input_size or cfg.method.backbone.image_size
    classes = ["class0", "class1"]
    refs = None
    if cfg.method.shots:
        refs = {c: torch.randn(cfg.method.shots, 3, size, size, device=device) for c in classes}
    m.prepare(classes, "industrial", refs)
    return m, cfg


def model_rate(m, cfg: EvalConfig, batch: int, device: torch.device, repeats: int = 3) -> float:
    """Images/s of the evaluator's model stage (normalise, predict under bf16, upsample, blur) on
    random uint8 images, the fastest of ``repeats`` after one warm-up batch."""
    size = cfg.method.input_size or cfg.method.backbone.image_size
    x = {"cls": [f"class{i % 2}" for i in range(batch)], "dataset": ["bench"] * batch,
         "domain": ["industrial"] * batch}
    times = []
    for i in range(repeats + 1):
        x["image"] = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        synchronize(device)
        t0 = time.perf_counter()
        score_batch(m, x, cfg, device, cfg.method.eval_size or size, torch.bfloat16)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return batch / min(times)


def best_batch(method: dict, device: torch.device, max_batch: int) -> tuple[int, dict[int, float]]:
    """The batch size with the most images/s of the model stage: doubling until memory runs out,
    the rate grows by less than ``GROWTH`` or ``max_batch`` is passed; returns it and the sweep."""
    m, cfg = prepared_method(method, device)
    sweep: dict[int, float] = {}
    batch = 1
    try:
        while batch <= max_batch:
            try:
                sweep[batch] = model_rate(m, cfg, batch, device)
            except torch.cuda.OutOfMemoryError:
                break
            if len(sweep) > 1 and sweep[batch] < GROWTH * max(v for b, v in sweep.items() if b < batch):
                break
            batch *= 2
    finally:
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not sweep:
        raise SystemExit(f"{method['name']}: not even one image fits on {device}")
    return max(sweep, key=sweep.get), sweep


def warm_up_metrics(device: torch.device) -> None:
    """One tiny batch through the metrics first, so that the first method measured does not also
    pay the one-off imports (scipy's labelling) and kernel loads of the metrics stage."""
    from zsadx.eval.evaluator import metric_state_device

    cfg = resolved(tiny_method("clip", 64))
    acc = ClassMetrics("warm-up", device=metric_state_device(cfg, device))
    mask = torch.zeros(2, 8, 8, dtype=torch.uint8)
    mask[1, 2:4, 2:4] = 1
    acc.add(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), torch.rand(2, 8, 8), mask)
    acc.compute()


def timed_eval(shards: Path, out: Path, method: dict, device: torch.device, overrides: list[str]) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = evaluate(eval_config(shards, out, method, [*overrides, f"device={device.type}",
                                                   f"untrained={str(is_trained(method['name'])).lower()}"]))
    r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return r


def row_of(name: str, cfg: EvalConfig, setting: str, batch: int, r: dict) -> Row:
    st = r["stage_seconds"]
    size = cfg.method.input_size or cfg.method.backbone.image_size
    return Row(method=name, backbone=cfg.method.backbone.name, size=size, setting=setting, batch=batch,
               images_per_second=r["images"] / st["total"], peak_gib=r["peak_gib"],
               load_share=st["load"] / st["total"], model_share=st["model"] / st["total"],
               metrics_share=st["metrics"] / st["total"])


def bench_method(name: str, shards: Path, out: Path, device: torch.device, args) -> list[Row]:
    method = method_config(name, args.smoke)
    cfg = resolved(method)
    batch, sweep = best_batch(method, device, args.max_batch)
    print(f"{name}: model-stage sweep (images/s by batch, bf16): "
          + ", ".join(f"{b}: {v:.1f}" for b, v in sweep.items()), flush=True)
    workers = [f"data.num_workers={args.workers}"]
    best = timed_eval(shards, out / f"{name}-bf16", method, device,
                      [f"data.batch_size={batch}", "autocast=bf16", *workers])
    b1 = timed_eval(shards, out / f"{name}-fp32", method, device, ["data.batch_size=1", 'autocast="no"', *workers])
    return [row_of(name, cfg, "bf16 best", batch, best), row_of(name, cfg, "fp32 b1", 1, b1)]


def print_table(rows: list[Row]) -> None:
    print(f"\n{'method':12s} {'backbone':18s} {'px':>4s} {'setting':10s} {'batch':>5s} {'img/s':>8s} "
          f"{'peak GiB':>8s} {'load':>6s} {'model':>6s} {'metrics':>7s}")
    for r in rows:
        peak = f"{r.peak_gib:8.2f}" if r.peak_gib is not None else f"{'-':>8s}"
        print(f"{r.method:12s} {r.backbone:18s} {r.size:4d} {r.setting:10s} {r.batch:5d} {r.images_per_second:8.1f} "
              f"{peak} {r.load_share:6.0%} {r.model_share:6.0%} {r.metrics_share:7.0%}")


def describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"cpu, {torch.get_num_threads()} threads"
    attention = (f"SDPA flash={torch.backends.cuda.flash_sdp_enabled()} "
                 f"mem_efficient={torch.backends.cuda.mem_efficient_sdp_enabled()}")
    return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {attention}"


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny CLIP at 64 px, a few images")
    p.add_argument("--methods", nargs="*", default=None, help=f"default: {' '.join(METHODS)}")
    p.add_argument("--images", type=int, default=None, help="test images (default 512; smoke 8)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch tried (default 128; smoke 2)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores - 2, at most 12)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    args.images = args.images or (8 if args.smoke else 512)
    args.max_batch = args.max_batch or (2 if args.smoke else 128)
    if args.workers is None:
        args.workers = 0 if args.smoke else max(1, min(12, (os.cpu_count() or 2) - 2))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    names = args.methods or METHODS
    unknown = [n for n in names if n not in load_all()]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    size = 64 if args.smoke else 518
    print(f"{args.images} synthetic {size} px images, {args.workers} loader workers; {describe(device)}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(tmp) / "data", args.images, size)
        warm_up_metrics(device)
        for name in names:
            rows += bench_method(name, shards, Path(tmp) / "out", device, args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
