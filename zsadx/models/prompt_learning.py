"""Learnable prompt pieces the trained methods compose.

* ``splice_tokens``: learnable token embeddings written into tokenised sentences at fixed positions
  (the "X X X object." placeholder trick of AnomalyCLIP / FAPrompt).
* ``DeepTextPrompts``: tokens that overwrite positions 1..n at the input of chosen text blocks
  (AnomalyCLIP, FAPrompt; AdaCLIP adds per-image dynamic tokens to them).
* ``DeepVisualPrompts``: VPT-deep tokens appended at the end of the vision sequence before the first
  block and replaced before the following prompted blocks (AdaCLIP).
* ``DynamicPromptGenerator``: one linear head per prompt token, from the CLIP image embedding.
* ``round_fp16``: the official codes' ``.half()`` cast of their prompts (``fp16_deep_prompts``).
* ``TextCache``: text features kept between evaluation calls while the tensors they come from
  are unchanged.

Blocks are numbered from 1 as everywhere in zsadx.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import torch
from torch import nn

from zsadx.models.backbone import ForwardContext, VisionHook


def splice_tokens(emb: torch.Tensor, tokens: torch.Tensor, start: int = 1) -> torch.Tensor:
    """``emb`` (..., L, D) with positions start..start+n-1 replaced by ``tokens`` (..., n, D), broadcast."""
    n = tokens.shape[-2]
    tokens = tokens.to(emb.dtype).expand(*emb.shape[:-2], n, emb.shape[-1])
    return torch.cat([emb[..., :start, :], tokens, emb[..., start + n:, :]], dim=-2)


def placeholder_sentence(n: int, rest: str, word: str = "X") -> str:
    """'X X X X object.': n placeholder words (one BPE token each) before ``rest``."""
    return " ".join([word] * n + [rest])


def round_fp16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded through fp16 and back, as the official ``.half()`` cast of a prompt does: the
    values are rounded forward, and the gradient arriving at this tensor is rounded backward."""
    return t.half().to(t.dtype)


class DeepTextPrompts(nn.Module):
    """Learnable tokens (length, width) for each of ``blocks`` (1-based text blocks), N(0, std^2)."""

    def __init__(self, width: int, length: int, blocks: Sequence[int], num_text_layers: int, std: float = 0.02):
        super().__init__()
        self.blocks = [int(b) for b in blocks]
        bad = [b for b in self.blocks if not 1 <= b <= num_text_layers]
        if bad:
            raise ValueError(f"deep text prompt block(s) {bad} out of range 1..{num_text_layers}")
        self.tokens = nn.ParameterList([nn.Parameter(torch.randn(length, width) * std) for _ in self.blocks])

    def as_dict(self, add: Optional[torch.Tensor] = None, fp16: bool = False,
                sentences: Optional[int] = None) -> dict[int, torch.Tensor]:
        """{block: tokens (+ ``add``, e.g. per-sentence dynamic tokens (T, n, D))} for ``encode_text``.

        ``fp16`` rounds as the official code does: it expands the tokens to each of the call's
        ``sentences`` first and casts that to fp16, so each sentence's gradient is rounded before
        the sum over sentences (rounding the (n, D) tokens once would round the summed gradient).
        """
        out = {}
        for b, p in zip(self.blocks, self.tokens):
            t = p if add is None else p + add
            if fp16:
                if t.dim() == 2:
                    if sentences is None:
                        raise ValueError("fp16 deep prompts need the number of sentences they are expanded to")
                    t = t.expand(sentences, *t.shape)
                t = round_fp16(t)
            out[b] = t
        return out


class DeepVisualPrompts(VisionHook):
    """VPT-deep prompts at the end of the vision sequence (AdaCLIP).

    Before block 1 the prompts for block 1 are appended (after ``ln_pre``: no positional embedding);
    before blocks 2..depth the last ``length`` tokens are replaced by that block's prompts; later
    blocks carry the last prompts' outputs along. Per-image dynamic tokens (B, length, width) given
    as ``extras={'visual_prompts': ...}`` are added to every block's static prompts. Taps and the
    pooled output never see the prompt tokens (``ctx.n_tokens``). ``fp16`` rounds each image's
    prompts through fp16, as the official code does.
    """

    def __init__(self, width: int, length: int, depth: int, std: float = 0.02, fp16: bool = False):
        super().__init__()
        self.length, self.fp16 = length, fp16
        self.static = nn.ParameterList([nn.Parameter(torch.randn(length, width) * std) for _ in range(depth)])
        self.layers = frozenset(range(2, depth + 1))

    def _prompts(self, i: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        p = self.static[i].to(x.dtype).expand(x.shape[0], -1, -1)
        dyn = ctx.extras.get("visual_prompts")
        p = p if dyn is None else p + dyn.to(x.dtype)
        # Official (AdaCLIP): the per-image prompts (static + dynamic) are cast to fp16.
        return round_fp16(p) if self.fp16 else p

    def begin(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return torch.cat([x, self._prompts(0, x, ctx)], dim=1)

    def block(self, layer: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext, call_next) -> torch.Tensor:
        x = torch.cat([x[:, :-self.length], self._prompts(layer - 1, x, ctx)], dim=1)
        return call_next(x)


class DynamicPromptGenerator(nn.Module):
    """``length`` independent Linear(in -> out) heads on an image embedding: (B, in) -> (B, length, out)."""

    def __init__(self, in_dim: int, out_dim: int, length: int):
        super().__init__()
        self.head = nn.ModuleList([nn.Linear(in_dim, out_dim) for _ in range(length)])

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(e) for h in self.head], dim=1)


class TextCache:
    """Text features an evaluation computes once and reuses while nothing they depend on changes.

    ``get(key, compute, tensors)`` returns ``compute()``; at evaluation (module in eval mode and
    gradients off) the result is kept per ``key`` and returned again for as long as every tensor of
    ``tensors`` keeps its storage and version counter (an in-place edit, ``load_state_dict``, an
    optimizer step or ``.to()`` changes them and empties the cache). With gradients on, or in
    training mode, it always computes afresh, so gradients flow and nothing goes stale. Edits made
    through ``tensor.data`` bypass the version counter: call ``clear``.
    """

    def __init__(self):
        self._items: dict[Hashable, Any] = {}
        self._state: Optional[tuple] = None

    def clear(self) -> None:
        self._items.clear()
        self._state = None

    @staticmethod
    def state_of(tensors: Iterable[torch.Tensor]) -> tuple:
        return tuple((t.data_ptr(), t.device, t.dtype, -1 if t.is_inference() else t._version) for t in tensors)

    def get(self, key: Hashable, compute: Callable[[], Any], tensors: Iterable[torch.Tensor],
            training: bool = False) -> Any:
        if training or torch.is_grad_enabled():
            return compute()
        state = self.state_of(tensors)
        if state != self._state:
            self.clear()
            self._state = state
        if key not in self._items:
            self._items[key] = compute()
        return self._items[key]
