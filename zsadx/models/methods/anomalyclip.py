"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompt learning + DPAM, faithful to the
official code at its current version (zqhang/AnomalyCLIP, after the 2025-04 aliasing fix).

* Vision: frozen; DPAM dual stream from block ``dpam_start`` (1-based; official 6..24 on ViT-L):
  the V-V stream adds V-V attention of LN1(original stream) at every DPAM block and skips the MLP;
  local tokens are the tapped V-V stream through the shared ln_post + proj (official: block 24
  only, local loss x 4, equivalent to the old 4 x block-24 "multi-scale" maps).
* Global feature: the original stream's CLS through proj *without* ln_post (official quirk, kept
  by default for checkpoint fidelity; ``cls_ln_post: true`` applies it).
* Text: "[12 learnable] object." / "[12 learnable] damaged object." (separate contexts, N(0, 0.02)),
  plus ``deep_depth - 1`` shared deep prompts of ``deep_length`` tokens overwriting positions
  1..length before text blocks 2..deep_depth (1-based). The dead 8 x Linear(768, 896) projections
  of the official code are not built.
* Scores: softmax(cos / 0.07); maps = abnormal probability summed over tapped layers, upsampled
  bilinearly, Gaussian sigma 4; image score = global only.
* Loss: lambda * sum_l [focal(M_l) + dice(M_l[1], gt) + dice(M_l[0], 1 - gt)] + CE(global), lambda 4.

* Evaluation encodes the text once and reuses it while the prompts are unchanged (``TextCache``).

Departures (all switchable): deep prompts are not rounded through fp16 unless
``fp16_deep_prompts: true`` (or ``paper_compat: true``): the official text block casts each
sentence's copy of the deep prompts with ``.half()``, so values and each sentence's gradient are
rounded; the text tower is frozen explicitly (the official code leaves its gradients on, computing
and discarding ~123 M gradients per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zsadx.models.attention import DPAMFeatures
from zsadx.models.losses import cross_entropy, segmentation_loss
from zsadx.models.methods import METHODS
from zsadx.models.methods.base import Method, MethodConfig, Prediction
from zsadx.models.prompt_learning import DeepTextPrompts, placeholder_sentence, splice_tokens
from zsadx.models.scoring import patches_to_maps


@dataclass
class AnomalyCLIPConfig(MethodConfig):
    name: str = "anomalyclip"
    layers: list[int] = field(default_factory=lambda: [24])
    dpam_start: int = 6
    n_ctx: int = 12
    deep_depth: int = 9
    deep_length: int = 4
    temperature: float = 0.07
    local_loss_weight: float = 4.0
    cls_ln_post: bool = False
    fp16_deep_prompts: bool = False
    init_std: float = 0.02
    sigma: float = 4.0

    PAPER_COMPAT: ClassVar[dict[str, Any]] = {"fp16_deep_prompts": True}


class ObjectAgnosticPrompts(nn.Module):
    """The two learnable sentences and the shared deep prompts; produces T (2, E), normalised."""

    def __init__(self, backbone, n_ctx: int, deep_depth: int, deep_length: int, std: float, fp16_deep: bool):
        super().__init__()
        width = backbone.text_width
        self.fp16 = fp16_deep
        self.ctx_pos = nn.Parameter(torch.randn(n_ctx, width) * std)
        self.ctx_neg = nn.Parameter(torch.randn(n_ctx, width) * std)
        if deep_depth - 1 >= backbone.num_text_layers:
            raise ValueError(f"deep_depth {deep_depth} needs more than {backbone.num_text_layers} text blocks")
        # Official "depth 9": prompts before text blocks 2..9 (1-based); block 1 sees the spliced input.
        self.deep = DeepTextPrompts(width, deep_length, range(2, deep_depth + 1), backbone.num_text_layers, std)
        ids = backbone.tokenize([placeholder_sentence(n_ctx, "object."), placeholder_sentence(n_ctx, "damaged object.")])
        self.register_buffer("ids", ids, persistent=False)

    def forward(self, backbone) -> torch.Tensor:
        ids = self.ids.to(self.ctx_pos.device)
        emb = splice_tokens(backbone.token_embeddings(ids), torch.stack([self.ctx_pos, self.ctx_neg]))
        deep = self.deep.as_dict(fp16=self.fp16, sentences=ids.shape[0])
        text = backbone.encode_text(ids, embeddings=emb, deep_prompts=deep)
        return F.normalize(text, dim=-1)


class AnomalyCLIP(Method):
    config_cls = AnomalyCLIPConfig
    summary = "AnomalyCLIP: object-agnostic learnable prompts + DPAM V-V attention (trained)"
    trained = True

    def __init__(self, cfg: AnomalyCLIPConfig, backbone=None):
        super().__init__(cfg, backbone)
        self.vision = DPAMFeatures(self.backbone, cfg.layers, cfg.dpam_start, cfg.cls_ln_post)
        self.prompts = ObjectAgnosticPrompts(self.backbone, cfg.n_ctx, cfg.deep_depth, cfg.deep_length, cfg.init_std,
                                             cfg.fp16_deep_prompts)

    def _probs(self, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return (feats @ text.float().T / self.cfg.temperature).softmax(-1)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        images, masks, labels = batch["image"], batch["mask"], batch["label"]
        tokens, g, grid = self.vision(self.backbone, images)
        text = self.prompts(self.backbone)
        local = images.new_zeros((), dtype=torch.float32)
        for t in tokens:
            p = patches_to_maps(self._probs(t, text), grid, masks.shape[-2:], self.cfg.align_corners)
            local = local + segmentation_loss(p, masks.to(images.device))
        glob = cross_entropy(g @ text.float().T / self.cfg.temperature, labels.to(images.device))
        total = self.cfg.local_loss_weight * local + glob
        return {"loss": total, "local": local.detach(), "global": glob.detach()}

    @torch.inference_mode()
    def predict(self, batch) -> Prediction:
        tokens, g, grid = self.vision(self.backbone, batch["image"])
        text = self.cached_text("text", lambda: self.prompts(self.backbone), [self.prompts])
        maps = sum(self._probs(t, text)[..., 1] for t in tokens).reshape(-1, *grid)
        scores = self._probs(g, text)[:, 1]
        return Prediction(maps=maps, scores=scores)


METHODS.register("anomalyclip", AnomalyCLIP)
