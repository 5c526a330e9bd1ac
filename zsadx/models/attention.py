"""Extra attention paths computed from a block's own weights: helpers and hooks.

Both DPAM (AnomalyCLIP's V-V attention) and GEM (FADE's self-self attention) keep a second token
stream next to the untouched CLIP stream: at every hooked block the extra stream adds an attention
output computed from ``LN1`` of the *original* stream, and never goes through the MLP. The hooks
here implement that once; the streams are tapped by name (``tap_stream='gem'``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from zsadx.models.backbone import ForwardContext, VisionHook


def split_heads(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a residual block's attention for input ``x`` (already LN1-ed): (B, H, L, d) each."""
    attn = block.attn
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    b, n, _ = x.shape
    qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> out_proj((B, L, H*d))."""
    b, h, n, d = x.shape
    return block.attn.out_proj(x.transpose(1, 2).reshape(b, n, h * d))


def self_self_attention(block: nn.Module, x: torch.Tensor, iterations: int = 1,
                        inv_temp: float | None = None) -> torch.Tensor:
    """GEM's self-self attention of ``x`` (the LN1 output) with the block's weights.

    q, k and v are each L2-normalised and refined ``iterations`` times by a softmax over their own
    cosine similarities (a clustering step), normalised again, turned into three attention maps that
    are all applied to the original v, averaged, and projected by the block's out_proj.

    ``inv_temp`` multiplies the cosine logits (gem-torch's ``ss_attn_temp`` is this inverse
    temperature, not a temperature); ``None`` is gem-torch's adaptive default: the mean token norm of
    ``x`` times head_dim^-1/2, per image.
    """
    q, k, v = split_heads(block, x)
    if inv_temp is None:
        inv_temp = x.norm(dim=-1).mean(dim=-1).view(-1, 1, 1, 1) * q.shape[-1] ** -0.5
    feats = [v, k, q]
    for _ in range(iterations):
        feats = [F.normalize(f, dim=-1) for f in feats]
        feats = [(inv_temp * f @ f.transpose(-2, -1)).softmax(-1) @ f for f in feats]
    feats = [F.normalize(f, dim=-1) for f in feats]
    out = sum((inv_temp * f @ f.transpose(-2, -1)).softmax(-1) @ v for f in feats) / 3.0
    return merge_heads(block, out)


def value_value_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DPAM's V-V attention: softmax(V V^T * d^-1/2) V with the block's weights."""
    _, _, v = split_heads(block, x)
    attn = (v @ v.transpose(-2, -1) * v.shape[-1] ** -0.5).softmax(-1)
    return merge_heads(block, attn @ v)


class DualStreamHook(VisionHook):
    """Keeps ``ctx.streams[name]``: from the first hooked block on, it starts as that block's input
    and accumulates ``path(block, LN1(original))`` at every hooked block (no MLP). The original
    stream runs unchanged, so CLIP's own outputs stay bit-identical."""

    def __init__(self, name: str, layers: Iterable[int],
                 path: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.name = name
        self.layers = frozenset(layers)
        self.path = path

    def block(self, layer: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext, call_next) -> torch.Tensor:
        extra = ctx.streams.get(self.name)
        if extra is None:
            extra = x
        ctx.streams[self.name] = extra + self.path(block, block.ln_1(x))
        return call_next(x)


def gem_layers(depth: int, num_layers: int) -> range:
    """The 1-based blocks gem-torch's ``depth`` turns into GEM blocks: the last ``depth - 1``
    (7 on 12 blocks: 7..12; 7 on 24 blocks: 19..24). gem-torch accepts 2..num_layers+1 (depth 1
    leaves no GEM block and its forward fails; a larger depth indexes past the first block)."""
    if not 2 <= depth <= num_layers + 1:
        raise ValueError(f"GEM depth {depth} outside 2..{num_layers + 1} "
                         f"(depth d makes the last d-1 of {num_layers} blocks GEM blocks)")
    return range(num_layers - depth + 2, num_layers + 1)


def gem_hook(depth: int, num_layers: int, iterations: int = 1, inv_temp: float | None = None) -> DualStreamHook:
    """GEM with gem-torch's parameters: ``depth`` (last depth-1 blocks, `gem_layers`),
    ``iterations`` (``ss_attn_iter``) and ``inv_temp`` (``ss_attn_temp``)."""
    return DualStreamHook("gem", gem_layers(depth, num_layers),
                          lambda blk, x: self_self_attention(blk, x, iterations, inv_temp))


class DPAMFeatures(nn.Module):
    """AnomalyCLIP's visual path, shared by the methods forked from it (FAPrompt).

    V-V dual stream on blocks ``dpam_start``..last; local tokens = the V-V stream of each tapped
    layer through the shared ``ln_post`` + ``proj``, L2-normalised; global = the original stream's
    CLS through ``proj`` (``ln_post`` only with ``cls_ln_post``: the official code skips it).
    Nothing visual is trained, so no activations are kept for backward.
    """

    def __init__(self, backbone, layers, dpam_start: int, cls_ln_post: bool = False):
        super().__init__()
        self.layers = backbone.check_layers(layers)
        backbone.check_layers([dpam_start])
        if dpam_start > min(self.layers):
            raise ValueError(f"tapped layers {self.layers} must come after dpam_start {dpam_start}")
        self.cls_ln_post = cls_ln_post
        self.hook = DualStreamHook("vv", range(dpam_start, backbone.num_layers + 1), value_value_attention)

    @torch.no_grad()
    def forward(self, backbone, images: torch.Tensor):
        """-> ([(B, N, E) per tapped layer], (B, E) global, grid)"""
        out = backbone.encode_image(images.to(backbone.dtype), layers=self.layers, hooks=[self.hook],
                                    tap_stream="vv")
        tokens = [F.normalize(backbone.project(out.layers[l][:, 1:]).float(), dim=-1) for l in self.layers]
        g = backbone.project(out.final[:, 0], ln=self.cls_ln_post)
        return tokens, F.normalize(g.float(), dim=-1), out.grid
