"""``zsadx predict``: score your own picture and write a heat-map overlay -- the first thing to try."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="score one image (optionally against normal references) and save a heat-map")
    p.add_argument("--method", required=True, help="method config, e.g. methods/winclip")
    p.add_argument("--image", required=True)
    p.add_argument("--ref", nargs="*", default=[], help="normal reference images (few-shot methods)")
    p.add_argument("--class-name", default="object", help="what the image shows, for class-aware prompts")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=None, help="overlay PNG (default: <image>_anomaly.png)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_main)


def read_images(image_path: str, refs: list[str]) -> list:
    """The decoded image and references; a missing, non-image or oversized file is a one-line
    :class:`~zsadx.data.transforms.ImageError` naming it (checked before any model is built)."""
    from zsadx.data.transforms import load_image

    return [load_image(image_path, "image")] + [load_image(r, "reference image") for r in refs]


def predict_image(method, image_path: str, refs: list[str], class_name: str):
    """(score, map at eval size, input tensor) for one image file."""
    from zsadx.data.transforms import EvalTransform
    from zsadx.models.scoring import gaussian_blur, upsample

    cfg = method.cfg
    size = cfg.input_size or cfg.backbone.image_size
    eval_size = cfg.eval_size or size
    t = EvalTransform(size=size)
    image, *ref_images = read_images(image_path, refs)
    x = t.image(image)[None]
    references = {class_name: torch.stack([t.image(r) for r in ref_images])} if refs else None
    method.prepare([class_name], "industrial", references)
    with torch.inference_mode():
        pred = method.predict({"image": x, "cls": [class_name]})
    maps = pred.maps.float()
    if not pred.final:
        maps = gaussian_blur(upsample(maps, eval_size, cfg.align_corners), cfg.sigma)
    shown = x if eval_size == size else torch.nn.functional.interpolate(x, size=(eval_size, eval_size),
                                                                         mode="bilinear", antialias=True)
    return float(pred.scores[0]), maps[0], shown[0]


def _main(args: argparse.Namespace) -> int:
    from zsadx.config import load_config, load_yaml
    from zsadx.eval.visualize import overlay_png
    from zsadx.eval.evaluator import EvalConfig
    from zsadx.models.methods.base import build_method

    read_images(args.image, args.ref)
    over = list(args.overrides)
    if args.ref:
        over.append(f"method.shots={len(args.ref)}")
    cfg = load_config(EvalConfig, data={"method": load_yaml(args.method), "data": {"shards": "-", "dataset": "-"}},
                      overrides=over).method
    method = build_method(cfg).eval()
    if args.checkpoint:
        method.load_checkpoint(args.checkpoint)
    score, amap, image = predict_image(method, args.image, args.ref, args.class_name)
    out = Path(args.out) if args.out else Path(args.image).with_name(Path(args.image).stem + "_anomaly.png")
    overlay_png(out, image, amap)
    print(f"{args.image}: anomaly score {score:.4f} ({cfg.name}{', %d references' % len(args.ref) if args.ref else ''})")
    print(f"heat-map overlay: {out}")
    return 0
