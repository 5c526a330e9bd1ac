"""Plain zero-shot CLIP: the baseline row of the ZSAD papers' tables.

Patch tokens of the chosen layers are projected into the joint space (ln_post + proj) and compared
with the "normal {cls}" / "damaged {cls}" text features; the map is the abnormal softmax
probability averaged over layers, the image score the same for the CLS embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from zsadx.models.methods import METHODS
from zsadx.models.methods.base import Method, MethodConfig, Prediction
from zsadx.models.prompts import CLIP_BASELINE, TextFeatureCache
from zsadx.models.scoring import grid_to_map, similarity_probs


@dataclass
class ClipBaselineConfig(MethodConfig):
    name: str = "clip"
    layers: list[int] = field(default_factory=lambda: [24])
    temperature: float = 0.01  # CLIP's learned logit scale is 100 = 1 / 0.01


class ClipBaseline(Method):
    config_cls = ClipBaselineConfig
    summary = "plain zero-shot CLIP (patch/text similarity, 'normal/damaged {class}')"

    def __init__(self, cfg: ClipBaselineConfig, backbone=None):
        super().__init__(cfg, backbone)
        self.layers = self.backbone.check_layers(cfg.layers)
        self.text = TextFeatureCache(self.backbone)

    def prepare(self, classes: Sequence[str], domain: str = "industrial", references=None) -> None:
        for c in classes:
            self.text.get(CLIP_BASELINE, c)

    @torch.inference_mode()
    def predict(self, batch) -> Prediction:
        bb = self.backbone
        out = bb.encode_image(batch["image"], layers=self.layers)
        text = self.text.batch(CLIP_BASELINE, batch["cls"]).to(out.pooled.dtype)  # (B, 2, E)
        scale = 1.0 / self.cfg.temperature
        maps = torch.stack([similarity_probs(bb.patch_tokens(out, l), text, scale) for l in self.layers]).mean(0)
        scores = similarity_probs(out.pooled[:, None], text, scale)[:, 0]
        return Prediction(maps=grid_to_map(maps, out.grid), scores=scores)


METHODS.register("clip", ClipBaseline, aliases=("clip-zero-shot",))
