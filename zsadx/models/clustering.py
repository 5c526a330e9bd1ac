"""Batched k-means on the device (AdaCLIP's HSF clusters every image's top patches).

The official code runs scikit-learn's KMeans per image on the CPU, unseeded. Here one call clusters
a whole batch: seeding, then Lloyd iterations until no assignment changes (or ``max_iter``); an
empty cluster keeps its previous centre. Seeding is ``farthest`` (deterministic farthest-first
traversal from the first point: results do not depend on a random state or on the other images of
the batch) or ``k-means++`` (D^2 sampling from a generator).
"""
from __future__ import annotations

from typing import Optional

import torch


def kmeans_plusplus(x: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, N, D) points -> (B, k, D) initial centres, D^2-weighted sampling per batch item."""
    b, n, _ = x.shape
    ar = torch.arange(b, device=x.device)
    # Draws happen on the CPU (a CPU generator), so results do not depend on the device.
    first = torch.randint(n, (b,), generator=generator).to(x.device)
    centres = [x[ar, first]]
    d2 = ((x - centres[0][:, None]) ** 2).sum(-1)
    for _ in range(1, k):
        w = d2.clamp_min(0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))  # all points coincide
        idx = torch.multinomial(w.double().cpu(), 1, generator=generator).to(x.device)[:, 0]
        c = x[ar, idx]
        centres.append(c)
        d2 = torch.minimum(d2, ((x - c[:, None]) ** 2).sum(-1))
    return torch.stack(centres, dim=1)


def farthest_first(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, D) -> (B, k, D): point 0, then repeatedly the point farthest from the chosen ones."""
    ar = torch.arange(x.shape[0], device=x.device)
    centres = [x[:, 0]]
    d2 = ((x - centres[0][:, None]) ** 2).sum(-1)
    for _ in range(1, k):
        c = x[ar, d2.argmax(1)]
        centres.append(c)
        d2 = torch.minimum(d2, ((x - c[:, None]) ** 2).sum(-1))
    return torch.stack(centres, dim=1)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, max_iter: int = 300, init: str = "farthest",
           generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each item of a batch: (B, N, D) -> labels (B, N), centres (B, k, D)."""
    x = x.float()
    k = min(k, x.shape[1])
    if init == "farthest":
        centres = farthest_first(x, k)
    elif init == "k-means++":
        centres = kmeans_plusplus(x, k, generator)
    else:
        raise ValueError(f"unknown k-means init '{init}' (farthest, k-means++)")
    labels = None
    for _ in range(max_iter):
        new = torch.cdist(x, centres).argmin(-1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)          # (B, N, k)
        counts = onehot.sum(1)                                               # (B, k)
        sums = onehot.transpose(1, 2) @ x                                     # (B, k, D)
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    return labels, centres
