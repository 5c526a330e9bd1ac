"""Adapters on the frozen backbone's residual stream (ACD-CLIP's Conv-LoRA and text LoRA).

* ``ConvLoRA``: per kernel size a branch ``tokens @ A (D -> r)`` -> k x k conv (r -> r_c) -> k x k
  conv (r_c -> r), scaled by conv_alpha / r_c, over the 2-D patch grid -> ``@ B (r -> D)`` scaled by
  alpha / sqrt(r); the branches are concatenated and fused by a 1 x 1 conv (n D -> D). Everything is
  linear, so the whole map is a linear operator on the token grid.
* ``LowRankAdapter``: ``h @ A @ B * alpha / sqrt(r)`` per token (ACD-CLIP's "text LoRA": a stand-alone
  map on the residual stream, not attached to a linear layer of CLIP).
* ``AdapterBlend``: how ACD-CLIP puts an adapter output back: per-token norm matching to the input,
  then ``(1 - w) x + w a`` with a learnable per-channel ``w`` (init 0.2).

Merging. The 1 x 1 fusion conv and both scales fold exactly into the branches' up-projections
(``ConvLoRA.merge_fusion``: the 2 D x D fusion weights disappear from inference). Folding an adapter
into CLIP's own weights is not possible: it acts on the residual stream *after* a block, with a
per-token norm ratio (non-linear), and Conv-LoRA mixes neighbouring tokens, which no per-token
linear layer of a ViT block can express.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def tokens_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) row-major patch tokens (conv1's flattening: p = row * cols + col) -> (B, C, rows, cols)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _init_low_rank(a: torch.Tensor, b: torch.Tensor, b_init: str) -> None:
    # As official: A Kaiming-uniform (PyTorch's default rule for a (D, r) tensor: fan_in = r), B N(0, 0.02^2).
    nn.init.kaiming_uniform_(a)  # a = 0; fan_in of a (D, r) tensor is r: U(+-sqrt(6 / r))
    if b_init == "zeros":
        nn.init.zeros_(b)
    elif b_init == "normal":
        nn.init.normal_(b, std=0.02)
    else:
        raise ValueError(f"unknown up-projection init '{b_init}' (normal, zeros)")


class ConvLoRABranch(nn.Module):
    def __init__(self, dim: int, rank: int, alpha: float, kernel: int, conv_rank: int, conv_alpha: float,
                 b_init: str = "normal"):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(dim, rank))
        self.conv_lora_A = nn.Conv2d(rank, conv_rank, kernel, padding=kernel // 2, bias=False)
        self.conv_lora_B = nn.Conv2d(conv_rank, rank, kernel, padding=kernel // 2, bias=False)
        self.lora_B = nn.Parameter(torch.empty(rank, dim))
        _init_low_rank(self.lora_A, self.lora_B, b_init)
        self.scale = alpha / math.sqrt(rank)
        self.conv_scale = conv_alpha / conv_rank

    def low_rank(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, D) -> (B, N, r): down-projection and the convolutions over the patch grid."""
        z = tokens_to_grid(tokens @ self.lora_A.to(tokens.dtype), grid)
        z = self.conv_lora_B(self.conv_lora_A(z)) * self.conv_scale
        return grid_to_tokens(z)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.low_rank(tokens, grid) @ self.lora_B.to(tokens.dtype) * self.scale


class ConvLoRA(nn.Module):
    """Multi-kernel Conv-LoRA on patch tokens (B, N, D) laid out on ``grid``; returns (B, N, D)."""

    def __init__(self, dim: int, rank: int = 16, alpha: float = 2.0, kernels: Sequence[int] = (3, 5),
                 conv_rank: int = 8, conv_alpha: float = 2.0, b_init: str = "normal"):
        super().__init__()
        self.conv_lora_blocks = nn.ModuleList([ConvLoRABranch(dim, rank, alpha, k, conv_rank, conv_alpha, b_init)
                                               for k in kernels])
        self.fusion_conv = nn.Conv2d(len(kernels) * dim, dim, 1, bias=False)
        self.merged_B: list[torch.Tensor] | None = None

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.merged_B is not None:
            return sum(br.low_rank(tokens, grid) @ b.to(tokens.dtype)
                       for br, b in zip(self.conv_lora_blocks, self.merged_B))
        cat = torch.cat([br(tokens, grid) for br in self.conv_lora_blocks], dim=-1)
        return cat @ self.fusion_conv.weight[:, :, 0, 0].T.to(cat.dtype)      # the 1x1 conv, on tokens

    @torch.no_grad()
    def merge_fusion(self) -> None:
        """Fold the 1x1 fusion conv and the output scale into each branch's up-projection (exact):
        sum_k (z_k B_k s) F_k^T = sum_k z_k (s B_k F_k^T). Inference only; ``unmerge`` undoes it."""
        fusion = self.fusion_conv.weight[:, :, 0, 0]
        d = fusion.shape[0]
        self.merged_B = [br.lora_B * br.scale @ fusion[:, i * d:(i + 1) * d].T
                         for i, br in enumerate(self.conv_lora_blocks)]

    def unmerge(self) -> None:
        self.merged_B = None


class LowRankAdapter(nn.Module):
    """``h @ A @ B * alpha / sqrt(r)`` on every token."""

    def __init__(self, dim: int, rank: int = 16, alpha: float = 2.0, b_init: str = "normal"):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(dim, rank))
        self.lora_B = nn.Parameter(torch.empty(rank, dim))
        _init_low_rank(self.lora_A, self.lora_B, b_init)
        self.scale = alpha / math.sqrt(rank)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.lora_A.to(h.dtype) @ self.lora_B.to(h.dtype) * self.scale


class AdapterBlend(nn.Module):
    """ACD-CLIP's ``AddWeight``: ``(1 - w) x + w * a * |x| / |a|`` per token, ``w`` learnable per channel.

    ``mode: residual`` uses ``x + a`` instead (a plain LoRA-style insertion: with a zero up-projection
    the backbone is untouched, which the official blend is not: it scales x by 1 - w)."""

    def __init__(self, dim: int, init: float = 0.2, mode: str = "blend"):
        super().__init__()
        if mode not in ("blend", "residual"):
            raise ValueError(f"unknown adapter insertion '{mode}' (blend, residual)")
        self.mode = mode
        self.i_w = nn.Parameter(torch.full((1, 1, dim), float(init))) if mode == "blend" else None

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.mode == "residual":
            return x + a
        a = a * (x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        w = self.i_w.to(x.dtype)
        return (1 - w) * x + w * a
