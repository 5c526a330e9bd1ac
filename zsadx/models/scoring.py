"""Scoring pieces the methods share: similarity maps, upsampling, smoothing, image scores."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def similarity_probs(tokens: torch.Tensor, text: torch.Tensor, scale: float, index: int = 1) -> torch.Tensor:
    """softmax(scale * <tokens, text>) over the text axis, column ``index`` (the abnormal class).

    ``tokens`` (B, N, E) and ``text`` (C, E) or per-image (B, C, E); both are L2-normalised here.
    """
    tokens = F.normalize(tokens, dim=-1)
    text = F.normalize(text, dim=-1)
    logits = scale * (tokens @ (text.transpose(-1, -2)))
    return logits.float().softmax(-1)[..., index]


def grid_to_map(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) patch values -> (B, rows, cols)."""
    return values.reshape(values.shape[0], *grid)


def upsample(maps: torch.Tensor, size: int | tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear (the seeds' choice; align_corners differs between them)."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=align_corners)[:, 0]


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's rule
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """scipy's 'reflect' border (d c b a | a b c d | d c b a), which torch's modes lack."""
    n = x.shape[dim]
    if r == 0:
        return x
    if r > n:  # tile the reflection for tiny maps
        reps = math.ceil(r / n) * 2 + 1
        flipped = torch.cat([x.flip(dim), x], dim)
        tiled = torch.cat([flipped] * reps, dim)
        start = reps * n - r  # keep x centred
        return tiled.narrow(dim, start, n + 2 * r)
    left = x.narrow(dim, 0, r).flip(dim)
    right = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([left, x, right], dim)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian filter of (B, H, W) maps, equal to ``scipy.ndimage.gaussian_filter``
    on each 2-D map (reflect border, truncate 4), but batched and on the maps' device."""
    if sigma <= 0:
        return maps
    k = _gaussian_kernel(sigma, truncate).to(maps.device)
    r = (k.numel() - 1) // 2
    x = maps.float()[:, None]
    x = _symmetric_pad(x, r, 3)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = _symmetric_pad(x, r, 2)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


# Image-score fusion rules of the seeds (data_eval.md C.3). Each method picks its own; the rule
# is a method setting, never a per-dataset knob.
FUSION_RULES = {
    "global": "the global (CLS) score alone -- AnomalyCLIP, AdaCLIP",
    "mean-with-max": "w * global + (1 - w) * max of the map -- FAPrompt (w 0.5, patch-level maps), "
                     "ACD-CLIP (w 0.9 industrial / 0.5 medical, full-resolution map)",
}


def fuse_image_score(global_score: torch.Tensor, maps: torch.Tensor | None, rule: str = "global",
                     weight: float = 1.0) -> torch.Tensor:
    """Image score from the global score and (optionally) the max of an anomaly map (B, H, W)."""
    if rule == "global":
        return global_score
    if rule == "mean-with-max":
        if maps is None:
            raise ValueError("rule 'mean-with-max' needs the anomaly maps")
        return weight * global_score + (1.0 - weight) * maps.flatten(1).amax(1)
    raise ValueError(f"unknown fusion rule '{rule}': {', '.join(FUSION_RULES)}")


def patches_to_maps(values: torch.Tensor, grid: tuple[int, int], size, align_corners: bool = False) -> torch.Tensor:
    """(B, N, C) per-patch values (probabilities or logits) -> (B, C, H, W), bilinearly resized to ``size``."""
    b, n, c = values.shape
    x = values.transpose(1, 2).reshape(b, c, *grid)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def hybrid_semantic_fusion(levels: list[torch.Tensor], anomaly: torch.Tensor, top: int = 100, clusters: int = 20,
                           init: str = "farthest") -> torch.Tensor:
    """AdaCLIP's HSF as the official code computes it (not as the paper describes it).

    ``levels``: normalised patch tokens (B, N, E) per tapped level; ``anomaly``: (B, N) per-patch
    anomaly probability. The ``top`` most anomalous patches (their tokens of all levels side by
    side) are clustered into ``clusters`` groups; each centroid is its members' mean over all
    levels, and the result is the L2-normalised mean of the centroids (B, E). Assignments are not
    differentiated; gradients reach the gathered tokens.
    """
    from zsadx.models.clustering import kmeans

    b, n, e = levels[0].shape
    idx = anomaly.topk(min(top, n), dim=1).indices                         # (B, K), most anomalous first
    feats = torch.cat([l.gather(1, idx[..., None].expand(-1, -1, e)) for l in levels], dim=-1)
    labels, _ = kmeans(feats.detach(), clusters, init=init)
    onehot = F.one_hot(labels, min(clusters, idx.shape[1])).to(feats.dtype)  # (B, K, C)
    counts = onehot.sum(1)                                                  # (B, C)
    centroids = (onehot.transpose(1, 2) @ feats) / counts.clamp_min(1)[..., None]
    centroids = centroids.reshape(b, -1, len(levels), e).mean(2)            # mean over levels too
    used = (counts > 0).to(feats.dtype)
    fused = (centroids * used[..., None]).sum(1) / used.sum(1, keepdim=True)
    return F.normalize(fused, dim=-1)


def gaussian_blur_kernel(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred with a fixed ``kernel_size`` Gaussian and torch's 'reflect' border (edge
    not repeated): kornia's ``gaussian_blur2d(border_type='reflect')``, which ACD-CLIP applies to
    its logit grids. (``gaussian_blur`` is scipy's rule: size from sigma, edge-repeating border.)"""
    if kernel_size <= 1 or sigma <= 0:
        return x
    pos = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    if kernel_size % 2 == 0:
        pos = pos + 0.5
    k = torch.exp(-pos ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    r = kernel_size // 2
    if kernel_size > min(x.shape[-2:]):
        raise ValueError(f"blur kernel {kernel_size} does not fit a {x.shape[-2]}x{x.shape[-1]} grid "
                         "(reflect padding needs kernel_size <= grid side)")
    y = F.pad(x, (r, kernel_size - 1 - r, r, kernel_size - 1 - r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
