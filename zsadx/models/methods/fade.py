"""FADE (BMVC 2024): training-free language- and vision-guided anomaly detection with GEM features.

Every switch of the official ``run_fade.py`` is a config key with the official default:

* Features: CLIP (standard stream) and GEM (self-self attention stream; `zsadx.models.attention`),
  CLS and patch tokens of both through ln_post + proj, L2-normalised. GEM takes gem-torch's
  parameters with gem-torch's meaning: ``gem_depth`` d makes the last d-1 blocks GEM blocks (7: the
  last 6, blocks 7..12 of ViT-B), ``ss_attn_temp`` is the *inverse* temperature multiplying the
  cosine logits (null: gem-torch's adaptive mean-token-norm * head_dim^-1/2). FADE's CLI leaves all
  three at gem-torch's defaults (7, 1, null).
  Classification at ``classification_img_size``; segmentation at every ``segmentation_img_sizes``
  (the image resized whole, positional embeddings interpolated; no sliding windows).
* Language: prompt files (``configs/prompts/*.json``), every sentence wrapped again as
  "a photo of a {s}." (``wrap_prompts``, as the official text encoder does), class name for
  classification, "object" for segmentation; ``text_model: average`` takes the mean normalised
  embedding per side without re-normalising; P_abn = softmax(100 * e . [m_n, m_a])[1].
* Vision: a memory bank per scale from ``shots`` normal references (train split) and/or the query
  itself (``use_query_img_in_vision_memory_bank``); patch score = k-th smallest 0.5 (1 - cos),
  k = 2 when the query is in the bank; scales resized to the largest grid and averaged, times
  ``vision_segmentation_multiplier``; s_vis = max of that map.
* Modes: classification both = (s_lang + s_vis) / 2 when shots > 0, else s_lang; segmentation
  both = (1 - w) L + w V; clipped to [0, 1], quantised to uint8 (truncating) and resized to
  ``eval_size`` with OpenCV's 8-bit bilinear resize (`resize_uint8`), as the official code does.
  ``language_classification_feature: gem`` scores the GEM stream's CLS token, as official does.

Every default is the official behaviour, so ``paper_compat`` (accepted) changes nothing. Remaining
difference: official resizes the original image to each scale with PIL bicubic; here the loader
gives one ``input_size`` image and the other scales are resized from it (torch antialiased bicubic;
~0.25% relative on the 240 px input).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any, ClassVar, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsadx.config import ConfigError
from zsadx.errors import UserError
from zsadx.models.attention import gem_hook
from zsadx.models.methods import METHODS
from zsadx.models.methods.base import Method, MethodConfig, Prediction
from zsadx.models.prompts import load_prompt_file

Mode = Literal["none", "language", "vision", "both"]


@dataclass
class FADEConfig(MethodConfig):
    name: str = "fade"
    classification_mode: Mode = "both"
    segmentation_mode: Mode = "both"
    language_classification_feature: Literal["clip", "gem"] = "clip"
    language_segmentation_feature: Literal["clip", "gem"] = "gem"
    vision_feature: Literal["clip", "gem"] = "gem"
    classification_img_size: int = 240
    segmentation_img_sizes: list[int] = field(default_factory=lambda: [240, 448, 896])
    shots: int = 1
    use_query_img_in_vision_memory_bank: bool = False
    vision_segmentation_multiplier: float = 3.5
    vision_segmentation_weight: float = 0.85
    text_model: Literal["average", "softmax", "max"] = "average"
    classification_prompts: list[str] = field(default_factory=lambda: ["winclip_prompt"])
    # The official default adds its five ChatGPT prompt files (chatgpt3.5_prompt1..5); drop them
    # into configs/prompts/ and list them here.
    segmentation_prompts: list[str] = field(default_factory=lambda: ["winclip_prompt"])
    segmentation_class_name: str = "object"
    wrap_prompts: bool = True
    # gem-torch's GEM parameters, gem-torch's meaning and defaults (FADE's CLI keeps them):
    gem_depth: int = 7                # the last gem_depth-1 blocks are GEM blocks (2..num_layers+1)
    ss_attn_iter: int = 1             # clustering iterations of self-self attention
    ss_attn_temp: Optional[float] = None   # INVERSE temperature on the cosine logits; null: adaptive
    normalize_segmentations: bool = False
    quantize_uint8: bool = True
    logit_scale: float = 100.0
    sigma: float = 0.0

    # Training-free and every default above is the official value: paper_compat has nothing to set.
    PAPER_COMPAT: ClassVar[dict[str, Any]] = {}

    def validate(self) -> None:
        super().validate()
        if self.gem_depth < 2:
            raise ConfigError(f"'method.gem_depth': {self.gem_depth}; gem_depth d makes the last d-1 blocks "
                              "GEM blocks, so use 2 or more (official: 7)")
        if self.ss_attn_iter < 0:
            raise ConfigError(f"'method.ss_attn_iter': {self.ss_attn_iter}; use 0 or more (official: 1)")
        t = self.ss_attn_temp
        if t is not None and not (math.isfinite(t) and t > 0):
            raise ConfigError(f"'method.ss_attn_temp': {t}; it is an inverse temperature: use a positive "
                              "number or null (adaptive, official)")


class FADE(Method):
    config_cls = FADEConfig
    summary = "FADE: language (CLIP/GEM) + vision (memory bank) guided, multi-scale (zero-/few-shot)"

    def __init__(self, cfg: FADEConfig, backbone=None):
        super().__init__(cfg, backbone)
        depth_max = self.backbone.num_layers + 1
        if not 2 <= cfg.gem_depth <= depth_max:
            raise ConfigError(f"'method.gem_depth' {cfg.gem_depth} outside 2..{depth_max}: gem_depth d makes "
                              f"the last d-1 of the backbone's {depth_max - 1} blocks GEM blocks")
        self.gem = gem_hook(cfg.gem_depth, self.backbone.num_layers, cfg.ss_attn_iter, cfg.ss_attn_temp)
        self.text_cls: dict[str, torch.Tensor] = {}
        self.text_seg: Optional[torch.Tensor] = None
        self.memory: dict[str, dict[int, torch.Tensor]] = {}

    # -- text ---------------------------------------------------------------------------------
    def _encode(self, sentences: list[str]) -> torch.Tensor:
        bb = self.backbone
        if self.cfg.wrap_prompts:
            sentences = [f"a photo of a {s}." for s in sentences]
        out = []
        with torch.no_grad():
            for lo in range(0, len(sentences), 64):
                ids = bb.tokenize(sentences[lo:lo + 64]).to(bb.visual.conv1.weight.device)
                out.append(bb.encode_text(ids, normalize=True).float())
        return torch.cat(out)

    def _text(self, files: list[str], cls_name: str) -> list[torch.Tensor]:
        """[normal (Nn, E), abnormal (Na, E)] prompt embeddings."""
        normal, abnormal = [], []
        for f in files:
            n, a = load_prompt_file(f)
            normal += [s.replace("{classname}", cls_name) for s in n]
            abnormal += [s.replace("{classname}", cls_name) for s in a]
        return [self._encode(normal), self._encode(abnormal)]

    def _probs(self, feats: torch.Tensor, text: list[torch.Tensor]) -> torch.Tensor:
        """P(abnormal) for L2-normalised features (..., E) under the configured text model."""
        s = self.cfg.logit_scale
        if self.cfg.text_model == "average":
            t = torch.stack([text[0].mean(0), text[1].mean(0)])  # not re-normalised (official)
            return (s * feats.float() @ t.T).softmax(-1)[..., 1]
        logits = [s * feats.float() @ t.T for t in text]
        if self.cfg.text_model == "softmax":
            p = torch.cat(logits, -1).softmax(-1)
            return p[..., text[0].shape[0]:].sum(-1)
        return torch.stack([l.amax(-1) for l in logits], -1).softmax(-1)[..., 1]  # max

    def prepare(self, classes: Sequence[str], domain: str = "industrial", references=None) -> None:
        for c in classes:
            name = c.replace("_", " ")
            if name not in self.text_cls:
                self.text_cls[name] = self._text(self.cfg.classification_prompts, name)
        if self.text_seg is None:
            self.text_seg = self._text(self.cfg.segmentation_prompts, self.cfg.segmentation_class_name)
        self.memory = {}
        if self.cfg.shots and references:
            with torch.inference_mode():
                for c, refs in references.items():
                    feats = self.features(self.backbone.input_images(refs), self.cfg.segmentation_img_sizes)
                    key = "gem" if self.cfg.vision_feature == "gem" else "clip"
                    self.memory[c] = {s: feats[s][key].flatten(0, 1) for s in self.cfg.segmentation_img_sizes}

    # -- vision -------------------------------------------------------------------------------
    def features(self, images: torch.Tensor, sizes: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Per size: 'clip_cls' and 'gem_cls' (B, E), 'clip' and 'gem' patch features (B, N, E), all
        through ln_post + proj and L2-normalised; 'grid'."""
        bb = self.backbone
        out = {}
        for s in sorted(set(sizes)):
            x = images if images.shape[-1] == s else F.interpolate(
                images.float(), size=(s, s), mode="bicubic", align_corners=False, antialias=True).to(images.dtype)
            res = bb.encode_image(x, layers=[bb.num_layers], hooks=[self.gem], tap_stream="gem")
            gem = F.normalize(bb.project(res.layers[bb.num_layers]).float(), dim=-1)
            clip = F.normalize(bb.project(res.final).float(), dim=-1)
            out[s] = {"clip_cls": clip[:, 0], "gem_cls": gem[:, 0], "clip": clip[:, 1:], "gem": gem[:, 1:],
                      "grid": res.grid}
        return out

    @staticmethod
    def _to_grid(values: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
        m = values.reshape(values.shape[0], 1, *grid)
        if grid != target:
            m = F.interpolate(m, size=target, mode="bilinear", align_corners=False)
        return m[:, 0]

    def _vision_map(self, cls: str, feats: dict, i: int, key: str, target) -> torch.Tensor:
        maps = []
        for s in self.cfg.segmentation_img_sizes:
            q = feats[s][key][i]                                 # (N, E)
            banks, k = [], 1
            if self.cfg.shots:
                if cls not in self.memory:
                    raise RuntimeError(f"FADE few-shot: no reference images were prepared for class '{cls}'")
                banks.append(self.memory[cls][s])
            if self.cfg.use_query_img_in_vision_memory_bank:
                banks.append(q)
                k = 2  # the query patch itself is its own nearest neighbour
            if not banks:
                raise RuntimeError("FADE vision mode needs shots > 0 or use_query_img_in_vision_memory_bank")
            bank = torch.cat(banks)
            dist = 0.5 * (1 - q @ bank.T)
            kth = dist.topk(min(k, bank.shape[0]), dim=-1, largest=False).values[:, -1]
            maps.append(self._to_grid(kth[None], feats[s]["grid"], target)[0])
        return torch.stack(maps).mean(0) * self.cfg.vision_segmentation_multiplier

    @torch.inference_mode()
    def predict(self, batch) -> Prediction:
        cfg = self.cfg
        images = self.backbone.input_images(batch["image"])
        sizes = list(cfg.segmentation_img_sizes) + [cfg.classification_img_size]
        feats = self.features(images, sizes)
        biggest = max(cfg.segmentation_img_sizes)
        target = feats[biggest]["grid"]
        b = images.shape[0]
        lang_map = torch.zeros(b, *target)
        if cfg.segmentation_mode in ("language", "both"):
            key = cfg.language_segmentation_feature
            lang_map = torch.stack([self._to_grid(self._probs(feats[s][key], self.text_seg), feats[s]["grid"], target)
                                    for s in cfg.segmentation_img_sizes]).mean(0)
        vis_map = torch.zeros(b, *target)
        needs_vision = cfg.segmentation_mode in ("vision", "both") or cfg.classification_mode in ("vision", "both")
        if needs_vision and (cfg.shots or cfg.use_query_img_in_vision_memory_bank):
            vis_map = torch.stack([self._vision_map(c, feats, i, cfg.vision_feature, target)
                                   for i, c in enumerate(batch["cls"])])
        # Image scores.
        cls_feat = feats[cfg.classification_img_size][f"{cfg.language_classification_feature}_cls"]
        s_lang = torch.stack([self._probs(cls_feat[i], self.text_cls[c.replace("_", " ")])
                              for i, c in enumerate(batch["cls"])])
        s_vis = vis_map.flatten(1).amax(1)
        score = {"language": s_lang, "vision": s_vis, "none": torch.zeros(b),
                 "both": (s_lang + s_vis) / 2 if cfg.shots > 0 else s_lang}[cfg.classification_mode]
        w = cfg.vision_segmentation_weight
        seg = {"language": lang_map, "vision": vis_map, "none": torch.zeros(b, *target),
               "both": (1 - w) * lang_map + w * vis_map}[cfg.segmentation_mode]
        if cfg.normalize_segmentations:
            lo = seg.flatten(1).amin(1).view(-1, 1, 1)
            hi = seg.flatten(1).amax(1).view(-1, 1, 1)
            seg = (seg - lo) / (hi - lo + 1e-12)
        seg = seg.clamp(0, 1)
        size = cfg.eval_size or cfg.backbone.image_size
        if cfg.quantize_uint8:
            seg = resize_uint8((seg * 255).to(torch.uint8), size).float() / 255
        else:
            seg = F.interpolate(seg[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return Prediction(maps=seg, scores=score.clamp(0, 1), final=True)


def resize_uint8(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w) uint8 maps -> (B, size, size) uint8 by ``cv2.resize`` with ``INTER_LINEAR`` (the
    default the official code uses). OpenCV interpolates 8-bit images in fixed point (11-bit weights,
    truncating SIMD steps), which a float bilinear resize and rounding miss by one level on ~12% of
    pixels; only OpenCV itself reproduces it."""
    try:
        import cv2
    except ImportError as e:
        raise UserError("FADE's uint8 maps are resized with OpenCV, which is not installed: "
                        "pip install opencv-python-headless (or set method.quantize_uint8=false)") from e
    resized = [cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in maps.cpu().numpy()]
    return torch.from_numpy(np.stack(resized)).to(maps.device)


METHODS.register("fade", FADE)
