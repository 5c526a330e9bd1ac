"""``zsadx demo``: the main job on the embedded default (tiny CLIP, synthetic data).

It grows with the package: today it encodes a synthetic image with a pasted defect through the
tiny backbone, scores its patches against a normal/damaged prompt pair and writes the resolved
config, a results file and a heat-map next to each other.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from zsadx.config import load_config, save_resolved
from zsadx.models.backbone import OPENAI_MEAN, OPENAI_STD, BackboneConfig


@dataclasses.dataclass
class DemoConfig:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    out_dir: str = "runs/demo"
    seed: int = 0


def synthetic_image(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth texture with one bright elliptical defect: (H, W, 3) uint8 image, (H, W) bool mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.15 * np.sin(2 * np.pi * (3 * xx + rng.random())) * np.cos(2 * np.pi * 2 * yy)
    img = np.stack([base * c for c in (0.9, 0.8, 0.7)], -1) + rng.normal(0, 0.02, (size, size, 3))
    cy, cx = rng.uniform(0.3, 0.7, 2)
    mask = ((yy - cy) / 0.08) ** 2 + ((xx - cx) / 0.12) ** 2 < 1
    img[mask] = [0.95, 0.2, 0.15]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def run(cfg: DemoConfig) -> dict:
    import torch

    from zsadx.models.backbone import ClipBackbone
    from zsadx.version import code_version

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    save_resolved(cfg, out)
    backbone = ClipBackbone(cfg.backbone)
    size = cfg.backbone.image_size
    img, mask = synthetic_image(size, cfg.seed)
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]
    with torch.inference_mode():
        layer = backbone.num_layers
        vis = backbone.encode_image(x[None], layers=[layer])
        patches = torch.nn.functional.normalize(backbone.patch_tokens(vis, layer), dim=-1)
        text = backbone.encode_text(backbone.tokenize(["a photo of a normal object.",
                                                       "a photo of a damaged object."]), normalize=True)
        probs = (backbone.logit_scale * patches @ text.T).softmax(-1)[0, :, 1]
    amap = probs.reshape(vis.grid).numpy()
    result = {"code_version": code_version(), "image_size": size, "grid": list(vis.grid),
              "embedding_dim": int(vis.pooled.shape[-1]), "max_patch_score": float(amap.max()),
              "defect_fraction": float(mask.mean()), "seconds": round(time.perf_counter() - t0, 3)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    try:
        from PIL import Image

        heat = np.kron(amap, np.ones((size // amap.shape[0], size // amap.shape[1])))
        heat = (255 * (heat - heat.min()) / (np.ptp(heat) + 1e-12)).astype(np.uint8)
        Image.fromarray(np.concatenate([img, np.stack([heat] * 3, -1)], 1)).save(out / "heatmap.png")
    except ImportError:
        pass
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (synthetic data, tiny CLIP)")
    p.add_argument("--config", default="demo", help="demo config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. out_dir=/tmp/demo seed=3")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(DemoConfig, args.config, args.overrides)
    result = run(cfg)
    print(json.dumps(result, indent=2))
    print(f"outputs in {cfg.out_dir}")
    return 0
