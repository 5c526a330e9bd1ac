"""Hand-crafted prompt ensembles and the cache of their text features.

A :class:`PromptSet` is state words x templates: every normal state and every anomalous state is
put into every template together with the class name; the sentences of each side are encoded,
L2-normalised, averaged and normalised again (CLIP's prompt ensembling). Features are computed
once per (prompt set, class name, backbone) and cached -- never per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PromptSet:
    name: str
    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]  # each with one '{}' for the state phrase

    def sentences(self, cls_name: str, anomalous: bool) -> list[str]:
        states = self.anomalous_states if anomalous else self.normal_states
        return [t.format(s.format(cls_name)) for s in states for t in self.templates]


# The plain zero-shot CLIP baseline of the papers' tables: one template, one state per side.
CLIP_BASELINE = PromptSet("clip", ("normal {}",), ("damaged {}",), ("a photo of a {}.",))


@torch.no_grad()
def ensemble(backbone, sentences: Sequence[str], batch: int = 256) -> torch.Tensor:
    """Mean of the normalised embeddings of ``sentences``, normalised: (E,)."""
    feats = []
    for lo in range(0, len(sentences), batch):
        ids = backbone.tokenize(sentences[lo:lo + batch]).to(backbone.visual.conv1.weight.device)
        feats.append(backbone.encode_text(ids, normalize=True).float())
    return F.normalize(torch.cat(feats).mean(0), dim=-1)


class TextFeatureCache:
    """(prompt set, class) -> (2, E) [normal, anomalous] text features, computed once."""

    def __init__(self, backbone):
        self.backbone = backbone
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, prompts: PromptSet, cls_name: str) -> torch.Tensor:
        key = (prompts.name, cls_name)
        if key not in self._cache:
            self._cache[key] = torch.stack([ensemble(self.backbone, prompts.sentences(cls_name, False)),
                                            ensemble(self.backbone, prompts.sentences(cls_name, True))])
        return self._cache[key]

    def batch(self, prompts: PromptSet, classes: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) for a batch's class names."""
        return torch.stack([self.get(prompts, c) for c in classes])

    def __len__(self) -> int:
        return len(self._cache)
