"""``zsadx demo``: the main job on the embedded default (tiny CLIP, synthetic data).

It grows with the package. Today it runs the whole data path: it writes synthetic downloads of an
industrial and a medical dataset in their real raw layouts, converts them to manifests, shards
them, reads the shards back with the evaluation loader and scores every image's patches against a
normal/damaged prompt pair with the tiny backbone. The resolved config, a results file and a
heat-map land in ``out_dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from zsadx.config import load_config, save_resolved
from zsadx.models.backbone import BackboneConfig


@dataclasses.dataclass
class DemoConfig:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["mvtec-ad", "kvasir"])
    images_per_group: int = 1
    out_dir: str = "runs/demo"
    seed: int = 0


def run(cfg: DemoConfig) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from zsadx.data.convert import convert
    from zsadx.data.loaders import EvalShards
    from zsadx.data.shards import write_shards
    from zsadx.data.synthetic import make_raw
    from zsadx.data.transforms import EvalTransform
    from zsadx.models.backbone import ClipBackbone
    from zsadx.version import code_version

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    save_resolved(cfg, out)
    size = cfg.backbone.image_size
    manifests = []
    for name in cfg.datasets:
        make_raw(name, out / "raw" / name, seed=cfg.seed, n=cfg.images_per_group)
        convert(name, out / "raw" / name, out / "manifests" / name, progress=False)
        manifests.append((out / "manifests" / name / "manifest.jsonl").read_text())
    (out / "manifest.jsonl").write_text("".join(manifests))
    index = write_shards(out / "manifest.jsonl", out / "shards", size=size, progress=False)
    t_data = time.perf_counter() - t0

    backbone = ClipBackbone(cfg.backbone)
    layer = backbone.num_layers
    with torch.inference_mode():
        text = backbone.encode_text(backbone.tokenize(["a photo of a normal object.",
                                                       "a photo of a damaged object."]), normalize=True)
    results, n_images, heat = {}, 0, None
    t1 = time.perf_counter()
    for name in cfg.datasets:
        loader = DataLoader(EvalShards(out / "shards", dataset=name, transform=EvalTransform(size=size)),
                            batch_size=16)
        scores, labels = [], []
        for batch in loader:
            with torch.inference_mode():
                vis = backbone.encode_image(batch["image"], layers=[layer])
                patches = torch.nn.functional.normalize(backbone.patch_tokens(vis, layer), dim=-1)
                probs = (backbone.logit_scale * patches @ text.T).softmax(-1)[..., 1]
            scores += probs.amax(1).tolist()
            labels += batch["label"].tolist()
            n_images += len(batch["label"])
            if heat is None and batch["label"].any():
                i = int(batch["label"].nonzero()[0])
                heat = (batch["image"][i], batch["mask"][i], probs[i].reshape(vis.grid))
        s, y = np.array(scores), np.array(labels)
        results[name] = {"images": len(y), "anomalous": int(y.sum()),
                         "mean_score_normal": float(s[y == 0].mean()) if (y == 0).any() else None,
                         "mean_score_anomalous": float(s[y == 1].mean()) if (y == 1).any() else None}
    result = {"code_version": code_version(), "image_size": size, "shards": index["samples"],
              "datasets": results, "data_seconds": round(t_data, 2),
              "images_per_second": round(n_images / (time.perf_counter() - t1), 1),
              "seconds": round(time.perf_counter() - t0, 2)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if heat is not None:
        _save_heatmap(out / "heatmap.png", *heat)
    return result


def _save_heatmap(path: Path, image, mask, amap) -> None:
    from PIL import Image

    from zsadx.models.backbone import OPENAI_MEAN, OPENAI_STD

    img = image.permute(1, 2, 0).numpy() * np.array(OPENAI_STD) + np.array(OPENAI_MEAN)
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    size = img.shape[0]
    a = amap.numpy()
    heat = np.kron(a, np.ones((size // a.shape[0], size // a.shape[1])))
    heat = (255 * (heat - heat.min()) / (np.ptp(heat) + 1e-12)).astype(np.uint8)
    gt = mask.numpy().astype(np.uint8) * 255
    panel = np.concatenate([img, np.stack([heat] * 3, -1), np.stack([gt] * 3, -1)], 1)
    Image.fromarray(panel).save(path)


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
