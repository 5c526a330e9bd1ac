"""Losses the trained methods share: focal and soft Dice on probability maps, cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities (no softmax inside), as AnomalyCLIP / AdaCLIP apply it.

    ``probs`` (B, C, ...) sum to 1 over C; ``target`` (B, ...) class ids (maps or image labels).
    One-hot targets are clamped to [eps, 1 - eps]; p_t = sum_c onehot_c p_c + eps; loss
    -(1 - p_t)^gamma log p_t, averaged over all positions of the batch (alpha = 1 for every class).
    """
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    onehot = onehot.clamp(eps, 1.0 - eps)
    pt = (onehot * probs).sum(1) + eps
    return (-(1.0 - pt) ** gamma * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per_row: bool = False) -> torch.Tensor:
    """Soft binary Dice per image, 1 - mean_n (2 sum(p g) + s) / (sum p + sum g + s).

    ``per_row`` computes it per image *row* (B x H units), which is what the official AdaCLIP code
    does by accident: its batch-1 masks are squeezed to (H, W), so "per sample" means per row.
    """
    if per_row:
        pred, target = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    p = pred.flatten(1)
    g = target.flatten(1).to(p.dtype)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return 1.0 - dice.mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels.long())


def segmentation_loss(probs: torch.Tensor, target: torch.Tensor, dice_per_row: bool = False) -> torch.Tensor:
    """The seeds' map loss: focal on (B, 2, H, W) [normal, anomalous] probabilities + Dice of the
    anomalous map against the mask + Dice of the normal map against its complement."""
    target = target.long()
    return (focal_loss(probs, target) + dice_loss(probs[:, 1], target, per_row=dice_per_row)
            + dice_loss(probs[:, 0], 1 - target, per_row=dice_per_row))


def binary_focal_loss(x: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0,
                      logits: bool = False) -> torch.Tensor:
    """alpha (1 - p_t)^gamma BCE, mean. ``x`` are probabilities, or logits with ``logits=True``."""
    y = labels.to(x.dtype)
    if logits:
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    else:
        bce = F.binary_cross_entropy(x.clamp(1e-6, 1 - 1e-6), y, reduction="none")
    pt = torch.exp(-bce)
    return (alpha * (1 - pt) ** gamma * bce).mean()


def orthogonality_loss(features: torch.Tensor) -> torch.Tensor:
    """sum over pairs k < m of |cos(f_k, f_m)| (FAPrompt's L_oc; summed, not averaged, as official)."""
    f = F.normalize(features.float(), dim=-1)
    cos = f @ f.T
    return cos.triu(diagonal=1).abs().sum()
