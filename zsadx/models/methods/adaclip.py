"""AdaCLIP (ECCV 2024): hybrid (static + dynamic) prompts in both branches + hybrid semantic fusion.

* Backbone: OpenAI ViT-L/14@336 at 518 px, run with GELU as the official code does (switch:
  ``backbone.activation``), positional embeddings resized bicubically. Tapped: the raw residual
  stream after blocks 6, 12, 18, 24 (no ln_post / proj), prompt tokens removed, CLS dropped.
* Dynamic prompts: ``length`` linear heads on e, the *un-prompted* CLIP image embedding (a second,
  gradient-free vision forward), give per-image tokens for the vision (width D) and text (width D_t)
  branches; they are added to the static prompts of every prompted block.
* Vision prompts (``DeepVisualPrompts``): appended after ln_pre before block 1, replaced before
  blocks 2..depth. Text prompts overwrite positions 1..length before text blocks 2..depth (the
  official static text prompt of block 1 is never used and is not built here).
* Text: AdaCLIP's class-aware ensemble (7 normal x 4 templates, 5 abnormal x 4), each sentence
  encoded with the image's prompts, normalised, averaged per state, normalised -> T (B, 2, E).
* Per level l: P_l = norm(Linear_l(patch tokens)), logits S_l = 100 P_l T. Global: f_cls =
  norm(Linear(prompted CLIP embedding)); with HSF f = norm(0.2 HSF + 0.8 f_cls). Image score =
  softmax(100 f T)[abnormal]. Map: logits upsampled bilinearly (align_corners True), mean over
  levels, softmax -> p_abnormal; Gaussian sigma 4.
* Loss: focal(image probabilities) + sum_l seg(softmax(upsampled S_l)).

Departures, with switches: batches of any size (official: 1); HSF's k-means runs batched on the
device with deterministic farthest-first seeding (``hsf_init: k-means++`` for random seeding;
official: scikit-learn per image, unseeded); Dice per image (``dice_per_row: true`` reproduces
the official per-row Dice of its squeezed batch-1 masks); prompts not rounded (``fp16_deep_prompts:
true`` rounds them as the official prompters' ``.half()`` casts do: each sentence's text prompts and
each image's visual prompts, static + dynamic, values and gradients). ``paper_compat: true`` sets
both (``AdaCLIPConfig.PAPER_COMPAT``). Training recipes do not pick the best epoch on the test
dataset as the official script does. The text is not cached between calls: its dynamic prompts
come from each image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zsadx.models.losses import focal_loss, segmentation_loss
from zsadx.models.methods import METHODS
from zsadx.models.methods.base import Method, MethodConfig, Prediction
from zsadx.models.prompt_learning import DeepTextPrompts, DeepVisualPrompts, DynamicPromptGenerator
from zsadx.models.prompts import PROMPT_SETS, ClassNameTable, batch_phrases
from zsadx.models.scoring import hybrid_semantic_fusion, patches_to_maps


@dataclass
class AdaCLIPConfig(MethodConfig):
    name: str = "adaclip"
    layers: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    prompt_length: int = 5
    prompt_depth: int = 4
    prompts: str = "adaclip"
    logit_scale: float = 100.0
    hsf: bool = True
    hsf_top: int = 100            # 5 x clusters
    hsf_clusters: int = 20
    hsf_alpha: float = 0.2
    hsf_init: Literal["farthest", "k-means++"] = "farthest"
    dice_per_row: bool = False
    fp16_deep_prompts: bool = False
    init_std: float = 0.02
    sigma: float = 4.0
    align_corners: bool = True

    PAPER_COMPAT: ClassVar[dict[str, Any]] = {"dice_per_row": True, "fp16_deep_prompts": True}
    # (dataset, class) -> the name in the prompts; default: each official dataset's own class name.
    class_names: Optional[str] = "prompts/adaclip_class_names.yaml"


class HybridTextPrompts(nn.Module):
    """Static deep text prompts + per-image dynamic tokens -> (B, 2, E) class-aware text features."""

    def __init__(self, backbone, prompt_set: str, length: int, depth: int, std: float, fp16: bool = False):
        super().__init__()
        self.fp16 = fp16
        if prompt_set not in PROMPT_SETS:
            raise ValueError(f"unknown prompt set '{prompt_set}' (known: {', '.join(PROMPT_SETS)})")
        self.prompt_set = PROMPT_SETS[prompt_set]
        self.static = DeepTextPrompts(backbone.text_width, length, range(2, depth + 1), backbone.num_text_layers, std)
        self.dynamic = DynamicPromptGenerator(backbone.embed_dim, backbone.text_width, length)
        self._ids: dict[str, tuple[torch.Tensor, int]] = {}

    def _class_ids(self, backbone, cls_name: str) -> tuple[torch.Tensor, int]:
        if cls_name not in self._ids:
            normal = self.prompt_set.sentences(cls_name, False)
            abnormal = self.prompt_set.sentences(cls_name, True)
            self._ids[cls_name] = (backbone.tokenize(list(normal) + list(abnormal)), len(normal))
        return self._ids[cls_name]

    def forward(self, backbone, classes: Sequence[str], e: torch.Tensor) -> torch.Tensor:
        dyn = self.dynamic(e)                                                   # (B, n, D_t)
        per = [self._class_ids(backbone, c) for c in classes]
        n_normal = {n for _, n in per}
        if len(n_normal) != 1:
            raise ValueError("every class must have the same number of sentences")
        n_normal = n_normal.pop()
        ids = torch.cat([i for i, _ in per]).to(e.device)                       # (B * S, L)
        s = per[0][0].shape[0]
        deep = self.static.as_dict(add=dyn.repeat_interleave(s, dim=0), fp16=self.fp16)   # per sentence
        feats = F.normalize(backbone.encode_text(ids, deep_prompts=deep).float(), dim=-1).reshape(len(classes), s, -1)
        return F.normalize(torch.stack([feats[:, :n_normal].mean(1), feats[:, n_normal:].mean(1)], dim=1), dim=-1)


class AdaCLIP(Method):
    config_cls = AdaCLIPConfig
    summary = "AdaCLIP: static + dynamic prompts in both branches, per-level projections, HSF (trained)"
    trained = True

    def __init__(self, cfg: AdaCLIPConfig, backbone=None):
        super().__init__(cfg, backbone)
        bb = self.backbone
        self.layers = bb.check_layers(cfg.layers)
        self.visual_prompts = DeepVisualPrompts(bb.width, cfg.prompt_length, cfg.prompt_depth, cfg.init_std,
                                                cfg.fp16_deep_prompts)
        self.visual_dynamic = DynamicPromptGenerator(bb.embed_dim, bb.width, cfg.prompt_length)
        self.text = HybridTextPrompts(bb, cfg.prompts, cfg.prompt_length, cfg.prompt_depth, cfg.init_std,
                                      cfg.fp16_deep_prompts)
        self.patch_proj = nn.ModuleList([nn.Linear(bb.width, bb.embed_dim) for _ in self.layers])
        self.cls_proj = nn.Linear(bb.embed_dim, bb.embed_dim)
        # As official: a class not in the table keeps '_' and codes, only '-' becomes a space.
        self.class_names = ClassNameTable(cfg.class_names, "dashes")

    def _run(self, images: torch.Tensor, classes: Sequence[str]) -> dict:
        cfg, bb = self.cfg, self.backbone
        images = bb.input_images(images)
        with torch.no_grad():
            e = bb.encode_image(images).pooled.float()                          # un-prompted CLIP embedding
        out = bb.encode_image(images, layers=self.layers, hooks=[self.visual_prompts],
                              extras={"visual_prompts": self.visual_dynamic(e)})
        patches = [F.normalize(proj(out.layers[l][:, 1:].float()), dim=-1) for proj, l in zip(self.patch_proj, self.layers)]
        f = F.normalize(self.cls_proj(out.pooled.float()), dim=-1)
        text = self.text(bb, classes, e)                                        # (B, 2, E)
        logits = [cfg.logit_scale * torch.einsum("bne,bce->bnc", p, text) for p in patches]
        if cfg.hsf:
            anomaly = torch.stack(logits).mean(0).softmax(-1)[..., 1]
            hsf = hybrid_semantic_fusion(patches, anomaly, cfg.hsf_top, cfg.hsf_clusters, cfg.hsf_init)
            f = F.normalize(cfg.hsf_alpha * hsf + (1 - cfg.hsf_alpha) * f, dim=-1)
        image_probs = (cfg.logit_scale * torch.einsum("be,bce->bc", f, text)).softmax(-1)
        return {"logits": logits, "image_probs": image_probs, "grid": out.grid}

    def loss(self, batch) -> dict[str, torch.Tensor]:
        images = batch["image"]
        masks, labels = batch["mask"].to(images.device), batch["label"].to(images.device)
        r = self._run(images, batch_phrases(self.class_names, batch))
        img = focal_loss(r["image_probs"], labels)
        size, ac = masks.shape[-2:], self.cfg.align_corners
        seg = sum(segmentation_loss(patches_to_maps(l, r["grid"], size, ac).softmax(1), masks,
                                    dice_per_row=self.cfg.dice_per_row) for l in r["logits"])
        return {"loss": img + seg, "image_focal": img.detach(), "seg": seg.detach()}

    @torch.inference_mode()
    def predict(self, batch) -> Prediction:
        images = batch["image"]
        r = self._run(images, batch_phrases(self.class_names, batch))
        # Bilinear upsampling is linear: the mean of upsampled logits is the upsampled mean.
        mean = torch.stack(r["logits"]).mean(0)
        maps = patches_to_maps(mean, r["grid"], images.shape[-2:], self.cfg.align_corners).softmax(1)[:, 1]
        return Prediction(maps=maps, scores=r["image_probs"][:, 1])


METHODS.register("adaclip", AdaCLIP)
