"""WinCLIP (Jeong et al., CVPR 2023): training-free, zero- and few-shot.

No official code exists; this follows the paper as the reference re-implementations read it
(anomalib, the AnomalyCLIP authors' Accurate-WinCLIP):

* Compositional prompt ensemble: 7 normal / 4 anomalous states x 22 templates (``templates: 21``
  reproduces the re-implementations' list), class-aware; text embeddings are averaged per side
  *before* normalisation (anomalib), ``normalize_text_each`` switches that.
* Window embeddings: for every k x k window of the patch grid (stride 1; k = 2 and 3), CLS plus the
  window's patch tokens (with their own positional embeddings) run through the whole transformer as a
  short sequence; its pooled CLS is the window embedding.
* Zero-shot: s(f) = softmax(cos(f, [t_n, t_a]) / 0.07)[a]; per scale, each patch takes the harmonic
  mean of the windows covering it; the final map is the harmonic mean of {image score, k=2 map,
  k=3 map}; the image score is s(image embedding). No smoothing.
* Few-shot (``shots`` > 0): memories of the references' final patch tokens and window embeddings;
  a query feature scores min over the memory of (1 - cos) / 2; windows aggregate harmonically; the
  three scales average into a few-shot map, averaged with the zero-shot map; the image score
  averages the zero-shot score with the few-shot map's maximum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from zsadx.models.backbone import ForwardContext
from zsadx.models.methods import METHODS
from zsadx.models.methods.base import Method, MethodConfig, Prediction
from zsadx.models.prompts import WINCLIP, WINCLIP_21, ClassNameTable, batch_phrases, text_features


@dataclass
class WinCLIPConfig(MethodConfig):
    name: str = "winclip"
    window_sizes: list[int] = field(default_factory=lambda: [2, 3])
    temperature: float = 0.07
    templates: Literal[22, 21] = 22
    normalize_text_each: bool = False
    # The word for the class in the prompts: ``class_name`` (one phrase for every class, as
    # anomalib's ``class_name`` argument), else the ``class_names`` table's entry for (dataset,
    # class), else the class name by ``class_name_rule``: "spaces" ('_' as spaces: "metal nut", the
    # paper's wording) or "raw" (the category as is: "metal_nut", anomalib; the paper_compat value).
    class_name: Optional[str] = None
    class_names: Optional[str] = None
    class_name_rule: Literal["spaces", "raw"] = "spaces"
    sigma: float = 0.0
    window_batch: int = 4096          # window sequences per transformer call (memory knob)

    # WinCLIP has no official code: paper_compat reproduces anomalib's torch model, the reference
    # zsadx was compared with (its 21-template list, the raw category name).
    PAPER_COMPAT: ClassVar[dict[str, Any]] = {"class_name_rule": "raw", "templates": 21}


def window_indices(grid: tuple[int, int], k: int) -> torch.Tensor:
    """(W, k*k) patch indices (row-major) of every k x k window, stride 1."""
    rows, cols = grid
    idx = torch.arange(rows * cols).reshape(rows, cols)
    wins = idx.unfold(0, k, 1).unfold(1, k, 1)  # (rows-k+1, cols-k+1, k, k)
    return wins.reshape(-1, k * k)


def harmonic_aggregate(window_scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows that cover it: (B, W) -> (B, N)."""
    member = torch.zeros(windows.shape[0], n_patches, dtype=window_scores.dtype, device=window_scores.device)
    member.scatter_(1, windows.to(window_scores.device), 1.0)
    inv_sum = (1.0 / window_scores.clamp_min(1e-12)) @ member
    return member.sum(0) / inv_sum


class WinCLIP(Method):
    config_cls = WinCLIPConfig
    summary = "WinCLIP: window embeddings + compositional prompts, harmonic aggregation (zero-/few-shot)"

    def __init__(self, cfg: WinCLIPConfig, backbone=None):
        super().__init__(cfg, backbone)
        self.prompts = WINCLIP if cfg.templates == 22 else WINCLIP_21
        self.class_names = ClassNameTable(cfg.class_names, cfg.class_name_rule)
        self.text: dict[str, torch.Tensor] = {}
        self.memory: dict[str, list[torch.Tensor]] = {}
        self._windows: dict[tuple, list[torch.Tensor]] = {}

    def _phrases(self, batch) -> list[str]:
        """The class phrase of each image of ``batch`` (its 'cls' and, if present, 'dataset')."""
        return [self.cfg.class_name or p for p in batch_phrases(self.class_names, batch)]

    def _class_text(self, name: str) -> torch.Tensor:
        """(2, E) text features of one class phrase, computed once."""
        if name not in self.text:
            self.text[name] = torch.stack([
                text_features(self.backbone, self.prompts.sentences(name, a), normalize_each=self.cfg.normalize_text_each)
                for a in (False, True)])
        return self.text[name]

    def windows(self, grid: tuple[int, int]) -> list[torch.Tensor]:
        if grid not in self._windows:
            self._windows[grid] = [window_indices(grid, k) for k in self.cfg.window_sizes]
        return self._windows[grid]

    def features(self, images: torch.Tensor):
        """Image embedding (B, E), final patch tokens after ln_post (B, N, D), window embeddings per scale."""
        bb = self.backbone
        tokens, grid = bb.embed_image(images)
        out = bb.encode_image(images)
        patches = bb.visual.ln_post(out.final[:, 1:])
        wins = []
        for idx in self.windows(grid):
            b, w = tokens.shape[0], idx.shape[0]
            seq = torch.cat([tokens[:, :1, None].expand(b, w, 1, -1), tokens[:, 1:][:, idx.to(tokens.device)]], 2)
            seq = seq.reshape(b * w, 1 + idx.shape[1], -1)
            pooled = []
            for lo in range(0, seq.shape[0], self.cfg.window_batch):
                part = seq[lo:lo + self.cfg.window_batch]
                ctx = ForwardContext(grid=grid, n_tokens=part.shape[1])
                x, _ = bb.run_blocks(part, ctx)
                pooled.append(bb.pool(x))
            wins.append(torch.cat(pooled).reshape(b, w, -1))
        return out.pooled, patches, wins, grid

    def prepare(self, classes: Sequence[str], domain: str = "industrial", references=None) -> None:
        for p in self._phrases({"cls": list(classes)}):  # no dataset here: a table's rows apply in predict
            self._class_text(p)
        self.memory = {}
        if self.cfg.shots and references:
            with torch.inference_mode():
                for c, refs in references.items():
                    _, patches, wins, _ = self.features(self.backbone.input_images(refs))
                    self.memory[c] = [F.normalize(patches.flatten(0, 1).float(), dim=-1)] + \
                                     [F.normalize(w.flatten(0, 1).float(), dim=-1) for w in wins]

    def _score(self, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """softmax(cos / T)[anomalous] for feats (B, ..., E) and per-image text (B, 2, E)."""
        f = F.normalize(feats.float(), dim=-1)
        t = F.normalize(text.float(), dim=-1)
        shape = f.shape
        logits = (f.reshape(shape[0], -1, shape[-1]) @ t.transpose(1, 2)) / self.cfg.temperature
        return logits.softmax(-1)[..., 1].reshape(shape[:-1])

    @torch.inference_mode()
    def predict(self, batch) -> Prediction:
        images = self.backbone.input_images(batch["image"])
        image_emb, patches, wins, grid = self.features(images)
        text = torch.stack([self._class_text(p) for p in self._phrases(batch)]).to(images.device)
        n = grid[0] * grid[1]
        img_score = self._score(image_emb, text)                        # (B,)
        scales = [img_score[:, None].expand(-1, n)]
        for idx, w in zip(self.windows(grid), wins):
            scales.append(harmonic_aggregate(self._score(w, text), idx, n))
        zero_shot = len(scales) / sum(1.0 / s.clamp_min(1e-12) for s in scales)
        maps, scores = zero_shot, img_score
        if self.cfg.shots:
            few = torch.stack([self._few_shot(c, patches[i], [w[i] for w in wins], grid)
                               for i, c in enumerate(batch["cls"])])
            maps = (zero_shot + few) / 2
            scores = (img_score + few.amax(1)) / 2
        return Prediction(maps=maps.reshape(-1, *grid), scores=scores)

    def _few_shot(self, cls: str, patches: torch.Tensor, wins: list[torch.Tensor], grid) -> torch.Tensor:
        if cls not in self.memory:
            raise RuntimeError(f"WinCLIP few-shot: no reference images were prepared for class '{cls}'")
        mem = self.memory[cls]
        n = grid[0] * grid[1]
        assoc = lambda q, m: ((1 - F.normalize(q.float(), dim=-1) @ m.T) / 2).amin(-1)
        scales = [assoc(patches, mem[0])]
        for idx, w, m in zip(self.windows(grid), wins, mem[1:]):
            scales.append(harmonic_aggregate(assoc(w, m)[None], idx, n)[0])
        return torch.stack(scales).mean(0)


METHODS.register("winclip", WinCLIP)
