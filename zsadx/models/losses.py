"""Losses the trained methods share: focal and soft Dice on probability maps, cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities (no softmax inside), as AnomalyCLIP / AdaCLIP apply it.

    ``probs`` (B, C, H, W) sum to 1 over C; ``target`` (B, H, W) class ids. One-hot targets are
    clamped to [eps, 1 - eps]; p_t = sum_c onehot_c p_c + eps; loss -(1 - p_t)^gamma log p_t,
    averaged over all pixels of the batch (alpha = 1 for every class).
    """
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    onehot = onehot.clamp(eps, 1.0 - eps)
    pt = (onehot * probs).sum(1) + eps
    return (-(1.0 - pt) ** gamma * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft binary Dice per image, 1 - mean_n (2 sum(p g) + s) / (sum p + sum g + s)."""
    p = pred.flatten(1)
    g = target.flatten(1).to(p.dtype)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return 1.0 - dice.mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels.long())
