"""ACD-CLIP: Conv-LoRA adapters in the vision tower, low-rank text adapters, and the Dynamic Fusion Gateway.

Faithful to the official code (cockmake/ACD-CLIP) as documented in docs/methods_b.md:

* Backbone: OpenAI ViT-L/14@336 at 518 px, exact GELU (the official config drops quick_gelu; switch
  ``backbone.activation``), bicubic positional-embedding resize, fp32. ``n_groups`` N pairs image
  blocks 24/N, 2*24/N, ... with text blocks 12/N, 2*12/N, ... (1-based; N in 2, 3, 4, 6).
* After each image level block: Conv-LoRA on the patch tokens (kernels 3 and 5, rank 16, alpha 2,
  conv rank 8, conv alpha 2, 1x1 fusion), norm-matched and blended back with a learnable
  per-channel weight (init 0.2); CLS untouched; the blended tokens continue through the tower and
  are the level's features. After each text level block: a low-rank adapter (rank 16, alpha 2)
  blended the same way (init 0.2); the level's text feature is a new LayerNorm of the EOT token.
* Heads per level: seg S_g = norm(LN(MLP(P_g))) per patch, det D_g = mean_p norm(LN(MLP(P_g))),
  MLP = Linear(D, 256) -> LeakyReLU(0.01) -> Linear(256, E).
* Text: class-aware ACD-CLIP prompts (3 normal, 5 abnormal states x 2 templates) filled with
  descriptive class names (``class_names`` file); per level and state: normalise, average, normalise.
* DFG, per image level i: gate(mean_p S_i) -> softmax over the N text levels, separately for the
  normal and abnormal column -> mixed text T~_i; logits L_i = 10 S_i T~_i.
* Test map: each L_i blurred on the patch grid (industrial 7x7 sigma 1, medical 9x9 sigma 1.5,
  reflect border), upsampled (align_corners), averaged over levels, softmax -> abnormal probability.
  Image score: c = mean_g D_g T_g (own text level, no temperature), p = softmax(c)[abnormal],
  score = 0.9 p + 0.1 max(map) (industrial) or 0.5 / 0.5 (medical).
* Loss: CE(c, y) + focal + 2 Dice on softmax(mean_g upsampled L_g) (un-blurred).
* Optimiser (configs/train/acdclip-*.yaml): Adam, image group lr 1e-3, text group lr 5e-4, decay 0.9
  per epoch, gradient clipping 1.0 on each blend weight only, 20 epochs, batch 6.

Departures: seeded (official: unseeded); the training augmentations (noise, colour jitter, rotation,
affine, flips) are not implemented yet; ``adapter_insertion: residual`` and ``lora_b_init: zeros`` are
extra options (not official). See zsadx/models/adapters.py for what can be merged for inference.
``paper_compat: true`` is accepted and changes nothing: the official code runs in fp32 (no
``.half()`` casts) and its defaults are zsadx's. Evaluation encodes each class's text once and
reuses it while the adapters are unchanged (``Method.cached_text``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zsadx.config import ConfigError
from zsadx.models.adapters import AdapterBlend, ConvLoRA, LowRankAdapter
from zsadx.models.backbone import VisionHook
from zsadx.models.losses import cross_entropy, segmentation_loss
from zsadx.models.methods import METHODS
from zsadx.models.methods.base import Method, MethodConfig, Prediction
from zsadx.models.prompts import PROMPT_SETS, ClassNameTable
from zsadx.models.scoring import gaussian_blur_kernel, patches_to_maps


@dataclass
class ACDCLIPConfig(MethodConfig):
    name: str = "acdclip"
    n_groups: int = 4
    lora_rank: int = 16
    lora_alpha: float = 2.0
    conv_kernels: list[int] = field(default_factory=lambda: [3, 5])
    conv_rank: int = 8
    conv_alpha: float = 2.0
    image_adapt_weight: float = 0.2
    text_adapt_weight: float = 0.2
    lora_b_init: Literal["normal", "zeros"] = "normal"
    adapter_insertion: Literal["blend", "residual"] = "blend"
    head_hidden: int = 256
    gate_hidden: int = 256
    logit_scale: float = 10.0
    prompts: str = "acdclip"
    class_names: Optional[str] = "prompts/acdclip_class_names.yaml"
    # Blur of the level logits on the patch grid: [kernel size, sigma] per domain.
    blur_industrial: list[float] = field(default_factory=lambda: [7, 1.0])
    blur_medical: list[float] = field(default_factory=lambda: [9, 1.5])
    # Image score = w * p_cls + (1 - w) * max(map), per domain.
    score_weight_industrial: float = 0.9
    score_weight_medical: float = 0.5
    blend_grad_clip: Optional[float] = 1.0
    sigma: float = 0.0
    align_corners: bool = True


def level_blocks(n_layers: int, n_groups: int, what: str) -> list[int]:
    if n_groups < 1 or n_layers % n_groups:
        raise ConfigError(f"'n_groups' {n_groups} must divide the {what} tower's {n_layers} blocks")
    step = n_layers // n_groups
    return [step * (g + 1) for g in range(n_groups)]


class Head(nn.Sequential):
    """Linear(D, hidden) -> LeakyReLU(0.01) -> Linear(hidden, E) -> LayerNorm(E); L2-normalised."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__(nn.Linear(dim, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, out), nn.LayerNorm(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x), dim=-1)


class VisionAdapterHook(VisionHook):
    """Conv-LoRA after each image level block, blended into the patch tokens (CLS untouched)."""

    def __init__(self, blocks: Sequence[int], adapters: nn.ModuleList, blends: nn.ModuleList):
        super().__init__()
        self.layers = frozenset(blocks)
        self.index = {b: i for i, b in enumerate(blocks)}
        self.adapters, self.blends = adapters, blends

    def block(self, layer, block, x, ctx, call_next):
        y = call_next(x)
        i = self.index[layer]
        patches = y[:, 1:ctx.n_tokens]
        adapted = self.blends[i](patches, self.adapters[i](patches, ctx.grid))
        return torch.cat([y[:, :1], adapted, y[:, ctx.n_tokens:]], dim=1)


class DynamicFusionGateway(nn.Module):
    """Per image level: text levels mixed by weights predicted from the level's mean seg token."""

    def __init__(self, dim: int, hidden: int, n_groups: int):
        super().__init__()
        self.n = n_groups
        self.gates = nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * n_groups))
                                    for _ in range(n_groups)])

    def weights(self, i: int, seg: torch.Tensor) -> torch.Tensor:
        """(B, N, E) seg tokens of level i -> (B, n_groups, 2) mixing weights (softmax over text levels)."""
        r = self.gates[i](seg.mean(1))
        return r.reshape(r.shape[0], self.n, 2).softmax(1)    # consecutive (normal, abnormal) pairs per level

    def forward(self, i: int, seg: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """text (B, n_groups, 2, E) -> mixed (B, 2, E); columns are convex mixes, not re-normalised."""
        return torch.einsum("bgc,bgce->bce", self.weights(i, seg), text)


class ACDCLIP(Method):
    config_cls = ACDCLIPConfig
    summary = "ACD-CLIP: Conv-LoRA adapters + text LoRA + Dynamic Fusion Gateway (trained)"
    trained = True

    def __init__(self, cfg: ACDCLIPConfig, backbone=None):
        super().__init__(cfg, backbone)
        bb = self.backbone
        n, w, tw = cfg.n_groups, bb.width, bb.text_width
        self.image_blocks = level_blocks(bb.num_layers, n, "image")
        self.text_blocks = level_blocks(bb.num_text_layers, n, "text")
        if cfg.prompts not in PROMPT_SETS:
            raise ConfigError(f"'prompts': unknown prompt set '{cfg.prompts}' (known: {', '.join(PROMPT_SETS)})")
        self.prompt_set = PROMPT_SETS[cfg.prompts]
        # (dataset, class) -> description (official REAL_NAMES); unlisted: the name, "_"/"-" as spaces.
        self.class_names = ClassNameTable(cfg.class_names, "spaces_and_dashes")
        # Image side (one optimizer group)
        self.image_adapters = nn.ModuleList([
            ConvLoRA(w, cfg.lora_rank, cfg.lora_alpha, cfg.conv_kernels, cfg.conv_rank, cfg.conv_alpha, cfg.lora_b_init)
            for _ in range(n)])
        self.image_blends = nn.ModuleList([AdapterBlend(w, cfg.image_adapt_weight, cfg.adapter_insertion)
                                           for _ in range(n)])
        self.seg_heads = nn.ModuleList([Head(w, cfg.head_hidden, tw) for _ in range(n)])
        self.det_heads = nn.ModuleList([Head(w, cfg.head_hidden, tw) for _ in range(n)])
        self.gateway = DynamicFusionGateway(tw, cfg.gate_hidden, n)
        # Text side (the other group)
        self.text_adapters = nn.ModuleList([LowRankAdapter(tw, cfg.lora_rank, cfg.lora_alpha, cfg.lora_b_init)
                                            for _ in range(n)])
        self.text_blends = nn.ModuleList([AdapterBlend(tw, cfg.text_adapt_weight, cfg.adapter_insertion)
                                          for _ in range(n)])
        self.text_norms = nn.ModuleList([nn.LayerNorm(tw) for _ in range(n)])
        # Not registered as a submodule: it only points at the adapters above (no duplicate state keys).
        object.__setattr__(self, "vision_hook", VisionAdapterHook(self.image_blocks, self.image_adapters,
                                                                  self.image_blends))

    # -- trainer integration --------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        text = [p for m in (self.text_adapters, self.text_blends, self.text_norms) for p in m.parameters()]
        ids = {id(p) for p in text}
        return {"image": [p for p in self.trainable_parameters() if id(p) not in ids], "text": text}

    def grad_clip_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """Official: clip_grad_norm_(1.0) on each blend weight separately, nothing else."""
        if not self.cfg.blend_grad_clip:
            return []
        return [(list(b.parameters()), self.cfg.blend_grad_clip) for b in (*self.image_blends, *self.text_blends)
                if list(b.parameters())]

    # -- text -----------------------------------------------------------------------------
    def _encode_class(self, phrase: str) -> torch.Tensor:
        """(n_groups, 2, E) text features of one class phrase."""
        bb = self.backbone
        normal = self.prompt_set.sentences(phrase, False)
        abnormal = self.prompt_set.sentences(phrase, True)
        ids = bb.tokenize(list(normal) + list(abnormal)).to(self.text_norms[0].weight.device)
        eot = ids.argmax(-1)
        rows = torch.arange(ids.shape[0], device=ids.device)
        level = {b: i for i, b in enumerate(self.text_blocks)}
        feats: dict[int, torch.Tensor] = {}

        def adapt(layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer not in level:
                return x
            i = level[layer]
            x = self.text_blends[i](x, self.text_adapters[i](x))
            feats[i] = F.normalize(self.text_norms[i](x[rows, eot].float()), dim=-1)
            return x

        bb.encode_text(ids, after_block=adapt)
        n = len(normal)
        per_level = [torch.stack([feats[i][:n].mean(0), feats[i][n:].mean(0)]) for i in range(len(self.text_blocks))]
        return F.normalize(torch.stack(per_level), dim=-1)

    def text_features(self, datasets: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
        """(B, n_groups, 2, E): computed once per distinct class of the batch; at evaluation kept
        across calls while the adapters are unchanged (``Method.cached_text``)."""
        text_side = (self.text_adapters, self.text_blends, self.text_norms)
        out = {key: self.cached_text(key, lambda key=key: self._encode_class(self.class_names(*key)), text_side)
               for key in dict.fromkeys(zip(datasets, classes))}
        return torch.stack([out[k] for k in zip(datasets, classes)])

    # -- forward --------------------------------------------------------------------------
    def _run(self, batch) -> dict:
        cfg, bb = self.cfg, self.backbone
        images = batch["image"]
        b = images.shape[0]
        datasets = batch.get("dataset") or ["-"] * b
        out = bb.encode_image(images, layers=self.image_blocks, hooks=[self.vision_hook])
        patches = [out.layers[l][:, 1:].float() for l in self.image_blocks]
        seg = [h(p) for h, p in zip(self.seg_heads, patches)]                   # (B, N, E) each
        det = [h(p).mean(1) for h, p in zip(self.det_heads, patches)]           # (B, E) each, not re-normalised
        text = self.text_features(datasets, batch["cls"])                     # (B, G, 2, E)
        logits = [cfg.logit_scale * torch.einsum("bne,bce->bnc", s, self.gateway(i, s, text))
                  for i, s in enumerate(seg)]
        cls_logits = torch.stack([torch.einsum("be,bce->bc", d, text[:, g]) for g, d in enumerate(det)]).mean(0)
        return {"logits": logits, "cls_logits": cls_logits, "grid": out.grid}

    def loss(self, batch) -> dict[str, torch.Tensor]:
        images = batch["image"]
        masks, labels = batch["mask"].to(images.device), batch["label"].to(images.device)
        r = self._run(batch)
        size = masks.shape[-2:]
        maps = [patches_to_maps(l, r["grid"], size, self.cfg.align_corners) for l in r["logits"]]
        probs = torch.stack(maps).mean(0).softmax(1)
        seg = segmentation_loss(probs, masks)
        ce = cross_entropy(r["cls_logits"], labels)
        return {"loss": ce + seg, "cls": ce.detach(), "seg": seg.detach()}

    @torch.inference_mode()
    def predict(self, batch) -> Prediction:
        cfg = self.cfg
        images = batch["image"]
        r = self._run(batch)
        domains = batch.get("domain") or ["industrial"] * images.shape[0]
        medical = torch.tensor([d == "medical" for d in domains], device=images.device)
        maps = []
        for l in r["logits"]:
            grid_logits = l.transpose(1, 2).reshape(l.shape[0], 2, *r["grid"])
            blurred = torch.where(medical[:, None, None, None],
                                  gaussian_blur_kernel(grid_logits, int(cfg.blur_medical[0]), cfg.blur_medical[1]),
                                  gaussian_blur_kernel(grid_logits, int(cfg.blur_industrial[0]), cfg.blur_industrial[1]))
            maps.append(F.interpolate(blurred, size=images.shape[-2:], mode="bilinear",
                                      align_corners=cfg.align_corners))
        anomaly = torch.stack(maps).mean(0).softmax(1)[:, 1]
        p_cls = r["cls_logits"].softmax(-1)[:, 1]
        w = torch.where(medical, cfg.score_weight_medical, cfg.score_weight_industrial).to(p_cls.dtype)
        score = w * p_cls + (1 - w) * anomaly.flatten(1).amax(1)
        return Prediction(maps=anomaly, scores=score)


METHODS.register("acdclip", ACDCLIP)
