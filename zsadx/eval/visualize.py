"""Heat-map overlays for a person to look at: image | anomaly map over the image | ground truth."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zsadx.models.backbone import OPENAI_MEAN, OPENAI_STD


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) image -> (H, W, 3) uint8: a normalised float tensor, or uint8 pixels as the loaders
    may hand them over (taken as they are)."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).numpy().copy()
    img = image.float().permute(1, 2, 0).numpy() * np.array(OPENAI_STD) + np.array(OPENAI_MEAN)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 with a blue-green-red ramp (no matplotlib needed)."""
    v = np.clip(values, 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def resize_map(amap: np.ndarray, size: int) -> np.ndarray:
    """A float map resized bilinearly to size x size (values between the map's own)."""
    if amap.shape == (size, size):
        return amap.astype(np.float32)
    img = Image.fromarray(amap.astype(np.float32)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def colour_bar(height: int, width: int) -> np.ndarray:
    """The :func:`jet` ramp as a vertical bar, its top the highest value."""
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, 1)
    return jet(ramp)


def overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5, vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:
    lo = amap.min() if vmin is None else vmin
    hi = amap.max() if vmax is None else vmax
    heat = jet((amap - lo) / (hi - lo + 1e-12))
    return (image * (1 - alpha) + heat * alpha).astype(np.uint8)


def overlay_png(path: Path, image: torch.Tensor, amap: torch.Tensor, mask: torch.Tensor | None = None) -> Path:
    img = denormalise(image)
    if img.shape[:2] != tuple(amap.shape):  # the input may be larger than the evaluation size (FADE)
        img = np.asarray(Image.fromarray(img).resize((amap.shape[1], amap.shape[0]), Image.BILINEAR))
    panels = [img, overlay(img, amap.float().numpy())]
    if mask is not None:
        panels.append(np.repeat((mask.numpy() > 0).astype(np.uint8)[..., None] * 255, 3, -1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, 1)).save(path)
    return path
