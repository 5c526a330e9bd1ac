"""Image and mask transforms, applied consistently to both.

The seeds resize images bicubically to S x S (aspect ratio squashed) and normalise with OpenAI's
mean/std. Masks are where they differ: AnomalyCLIP, AdaCLIP and FAPrompt resize the 0/255 mask
bilinearly and keep > 0.5; ACD-CLIP and anomalib resize with nearest neighbour. Both rules are
offered (``mask_resize``); shards keep what each rule needs (see ``shards.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from zsadx.models.backbone import OPENAI_MEAN, OPENAI_STD

MaskResize = Literal["bilinear", "nearest"]


def resize_image(im: Image.Image, size: int) -> Image.Image:
    im = im.convert("RGB")
    return im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC)


def soft_mask(mask: Image.Image, size: int, threshold: int = 0) -> Image.Image:
    """Binarise at ``threshold`` (0/255), then resize bilinearly: 8-bit coverage of each pixel."""
    binary = Image.fromarray(((np.asarray(mask.convert("L")) > threshold) * 255).astype(np.uint8))
    return binary if binary.size == (size, size) else binary.resize((size, size), Image.BILINEAR)


def nearest_mask(mask: Image.Image, size: int, threshold: int = 0) -> Image.Image:
    """Binarise at ``threshold`` (0/255), then resize with nearest neighbour (size 0: keep)."""
    binary = Image.fromarray(((np.asarray(mask.convert("L")) > threshold) * 255).astype(np.uint8))
    return binary if not size or binary.size == (size, size) else binary.resize((size, size), Image.NEAREST)


@dataclass
class EvalTransform:
    """PIL image (+ mask) -> normalised float tensor (3, S, S) and uint8 mask (S, S) in {0, 1}."""

    size: int = 518
    mask_resize: MaskResize = "bilinear"
    mask_size: int | None = None  # metrics resolution, when it differs from the model input
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def image(self, im: Image.Image) -> torch.Tensor:
        arr = np.asarray(resize_image(im, self.size), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (t - mean) / std

    def mask(self, soft: Image.Image | None, hard: Image.Image | None = None) -> torch.Tensor:
        """Binary mask from the stored soft (bilinear) or hard (nearest) mask; zeros when absent."""
        size = self.mask_size or self.size
        if soft is None and hard is None:
            return torch.zeros(size, size, dtype=torch.uint8)
        if self.mask_resize == "nearest":
            src = hard if hard is not None else soft
            arr = np.asarray(nearest_mask(src, size, 127 if hard is None else 0))
            return torch.from_numpy((arr > 0).astype(np.uint8))
        src = soft if soft is not None else hard
        m = src.convert("L")
        if m.size != (size, size):
            m = m.resize((size, size), Image.BILINEAR)
        # torchvision's ToTensor then "> 0.5", as the seeds do: 8-bit value > 127.5.
        return torch.from_numpy((np.asarray(m) > 127).astype(np.uint8))
