"""FADE (BMVC 2024): training-free language- and vision-guided anomaly detection with GEM features.

Every switch of the official ``run_fade.py`` is a config key with the official default:

* Features: CLIP (standard stream) and GEM (self-self attention stream on the last blocks from
  ``gem_depth``; `zsadx.models.attention.gem_hook`), both through ln_post + proj and L2-normalised.
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
  both = (1 - w) L + w V; clipped to [0, 1] and quantised to uint8 as the official code does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

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
    gem_depth: int = 7                # GEM on blocks gem_depth..last, 1-based (7..12 on ViT-B)
    ss_attn_iter: int = 1
    ss_attn_temp: Optional[float] = None
    normalize_segmentations: bool = False
    quantize_uint8: bool = True
    logit_scale: float = 100.0
    sigma: float = 0.0


class FADE(Method):
    config_cls = FADEConfig
    summary = "FADE: language (CLIP/GEM) + vision (memory bank) guided, multi-scale (zero-/few-shot)"

    def __init__(self, cfg: FADEConfig, backbone=None):
        super().__init__(cfg, backbone)
        if not 1 <= cfg.gem_depth <= self.backbone.num_layers:
            from zsadx.config import ConfigError

            raise ConfigError(f"'method.gem_depth' {cfg.gem_depth} outside 1..{self.backbone.num_layers}")
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
                    feats = self.features(refs.to(self.backbone.dtype), self.cfg.segmentation_img_sizes)
                    key = "gem" if self.cfg.vision_feature == "gem" else "clip"
                    self.memory[c] = {s: feats[s][key].flatten(0, 1) for s in self.cfg.segmentation_img_sizes}

    # -- vision -------------------------------------------------------------------------------
    def features(self, images: torch.Tensor, sizes: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Per size: 'cls' (B, E), 'clip' and 'gem' patch features (B, N, E), all L2-normalised; 'grid'."""
        bb = self.backbone
        out = {}
        for s in sorted(set(sizes)):
            x = images if images.shape[-1] == s else F.interpolate(
                images.float(), size=(s, s), mode="bicubic", align_corners=False, antialias=True).to(images.dtype)
            res = bb.encode_image(x, layers=[bb.num_layers], hooks=[self.gem], tap_stream="gem")
            gem = bb.project(res.layers[bb.num_layers][:, 1:])
            clip = bb.project(res.final[:, 1:])
            out[s] = {"cls": F.normalize(res.pooled.float(), dim=-1), "gem": F.normalize(gem.float(), dim=-1),
                      "clip": F.normalize(clip.float(), dim=-1), "grid": res.grid}
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
        images = batch["image"].to(self.backbone.dtype)
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
        cls_feat = feats[cfg.classification_img_size]["cls"] if cfg.language_classification_feature == "clip" \
            else feats[cfg.classification_img_size]["gem"].mean(1)
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
        if cfg.quantize_uint8:  # stored as uint8, resized as uint8 (cv2 rounds), as the official code does
            seg = (seg * 255).to(torch.uint8).float()
        size = cfg.eval_size or cfg.backbone.image_size
        seg = F.interpolate(seg[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        if cfg.quantize_uint8:
            seg = seg.round().clamp(0, 255) / 255
        return Prediction(maps=seg, scores=score.clamp(0, 1), final=True)


METHODS.register("fade", FADE)
