"""Rule-based key mapping for official checkpoint files whose layout is a flat ``{name: tensor}``
dict (AdaCLIP, ACD-CLIP): official key patterns -> zsadx keys or known-dead, shape-decided config
values, and the fit to a built method's trainable state."""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from zsadx.models.checkpoints import CheckpointError

# A rule: official key pattern -> zsadx key built from the match (None: known-dead, dropped).
Rule = tuple[str, Optional[Callable[[re.Match], str]]]


def match_keys(flat: Mapping[str, torch.Tensor], rules: Sequence[Rule], what: str
               ) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """Map every official key by the first rule that matches it whole.

    Returns ({zsadx key: (official key, tensor)}, dropped official keys); a key no rule matches is
    an error naming it."""
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    dropped: list[str] = []
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    for key, value in flat.items():
        for pattern, target in compiled:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            if target is None:
                dropped.append(key)
            else:
                mapped[target(m)] = (key, value)
            break
        else:
            raise CheckpointError(f"{what}: key '{key}' is not part of the official layout "
                                  f"(neither used by the official code nor known to be dead); not loaded")
    return mapped, dropped


def check_decided(decided: Mapping[str, Any], cfg: Any, what: str, evidence: Mapping[str, str]) -> None:
    """Each config value the file's shapes decide must equal the method config's."""
    for key, value in decided.items():
        have = getattr(cfg, key)
        if have != value:
            raise CheckpointError(f"{what}: the file has {key} = {value} ({evidence[key]}) but the method config "
                                  f"has {key} = {have}; set method.{key}: {value}")


def fit_to_method(mapped: Mapping[str, tuple[str, torch.Tensor]], method, what: str) -> dict[str, torch.Tensor]:
    """The mapped tensors as the method's trainable state: every trainable key present, each
    shape the method's (a different one means another backbone), values cast to its dtype."""
    want = method.trainable_state_dict()
    missing = sorted(set(want) - set(mapped))
    if missing:
        raise CheckpointError(f"{what}: the file has nothing for zsadx's '{missing[0]}' ({len(missing)} keys "
                              f"missing): it was saved by another configuration of the official code")
    extra = sorted(set(mapped) - set(want))
    if extra:
        raise CheckpointError(f"{what}: key '{mapped[extra[0]][0]}' has no place in this method config "
                              f"(would be zsadx's '{extra[0]}')")
    state = {}
    for key, target in want.items():
        official, value = mapped[key]
        if tuple(value.shape) != tuple(target.shape):
            b = method.backbone
            raise CheckpointError(
                f"{what}: '{official}' has shape {tuple(value.shape)} but this method on backbone {b.cfg.name} "
                f"(width {b.width}, text width {b.text_width}, embed dim {b.embed_dim}) needs "
                f"{tuple(target.shape)}: the file was trained on another backbone")
        state[key] = value.detach().to(dtype=target.dtype).clone()
    return state


def origins(mapped: Mapping[str, tuple[str, torch.Tensor]]) -> dict[str, str]:
    """zsadx key -> the official key it came from."""
    return {key: official for key, (official, _) in mapped.items()}


def indices(flat: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern``'s first group over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in flat if (m := rx.fullmatch(k))})


def consecutive(found: list[int], what: str, key: str) -> int:
    """The count of ``found`` = 0..n-1 (a gap means a damaged file)."""
    if found != list(range(len(found))):
        raise CheckpointError(f"{what}: '{key}' indices {found} are not 0..{len(found) - 1}")
    return len(found)
