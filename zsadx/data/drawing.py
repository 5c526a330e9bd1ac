"""Painting primitives of the synthetic downloads: textures, organ-like scans, pasted defects, file writers.

The dataset plug-ins import these to write their raw layouts (``DatasetPlugin.synthesize``); the
driver that picks a plug-in and writes a whole download (:func:`zsadx.data.synthetic.make_raw`)
sits above the plug-ins. This module imports nothing of zsadx.

The defects are made to be detectable: a patch with a different colour and texture over a smooth
background, so that even a tiny randomly initialised CLIP separates them in few-shot mode and a
trained one learns them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def texture(h: int, w: int, rng: np.random.Generator, kind: str = "industrial", gray: bool = False) -> np.ndarray:
    """(h, w, 3) uint8 background: woven/striped surfaces for industrial, an organ-like blob for medical."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "medical":
        cy, cx = h / 2 + rng.normal(0, h / 20), w / 2 + rng.normal(0, w / 20)
        r = ((yy - cy) / (0.38 * h)) ** 2 + ((xx - cx) / (0.32 * w)) ** 2
        organ = np.clip(1.2 - r, 0, 1) ** 0.5
        base = 0.08 + 0.6 * organ + 0.05 * np.sin(xx / 3.0 + rng.random() * 6)
        img = np.stack([base, base * 0.95, base * 0.9], -1)
    else:
        f1, f2 = rng.uniform(0.15, 0.4, 2)
        phase = rng.random(2) * 2 * np.pi
        base = 0.55 + 0.12 * np.sin(f1 * xx + phase[0]) * np.cos(f2 * yy + phase[1])
        tint = rng.uniform(0.7, 1.0, 3)
        img = base[..., None] * tint
    img = img + rng.normal(0, 0.015, img.shape)
    if gray:
        img = np.repeat(img.mean(-1, keepdims=True), 3, -1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def paste_defect(img: np.ndarray, rng: np.random.Generator, scale: float = 0.18) -> np.ndarray:
    """Paint an elliptical defect in place; return its bool mask (never empty)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = max(2.0, scale * h * rng.uniform(0.7, 1.3)), max(2.0, scale * w * rng.uniform(0.7, 1.3))
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    colour = np.array([200, 40, 30]) if rng.random() < 0.5 else np.array([20, 20, 20])
    noise = rng.normal(0, 12, (int(mask.sum()), 3))
    img[mask] = np.clip(colour + noise, 0, 255).astype(np.uint8)
    return mask


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    """Write an image by the path's extension (png/jpg/bmp/tif), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        path.suffix.lower(), "PNG")
    im.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def save_mask(path: Path, mask: np.ndarray, value: int = 255) -> Path:
    return save(path, (mask.astype(np.uint8) * value), "L")


def sample(h: int, w: int, rng: np.random.Generator, anomalous: bool, kind: str = "industrial",
           gray: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask (all False for normal images)."""
    img = texture(h, w, rng, kind, gray)
    mask = paste_defect(img, rng) if anomalous else np.zeros((h, w), bool)
    if gray:
        img[...] = img.mean(-1, keepdims=True).astype(np.uint8)
    return img, mask
