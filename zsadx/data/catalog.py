"""The dataset catalog entry: what zsadx knows about a dataset before reading any file of it.

Pure data, importing nothing of zsadx: the plug-ins (``zsadx.data.convert.*``) hold one entry each,
and the registry of plug-ins lives above them in :mod:`zsadx.data.convert.plugins`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Domain = Literal["industrial", "medical", "any"]


@dataclass(frozen=True)
class DatasetEntry:
    """What zsadx knows about a dataset before reading any file of it."""

    name: str
    title: str
    domain: Domain
    classes: tuple[str, ...]
    has_masks: bool
    layout: str                      # the raw folder layout the converter expects, in words
    splits: tuple[str, ...] = ("test",)
    aliases: tuple[str, ...] = ()
    variants: tuple[str, ...] = ("default",)
    default_variant: str = "default"
    source: str = ""                 # download page; nothing is downloaded by zsadx
    licence: str = ""
    notes: str = ""
    # Natural-language class names some methods prompt with (class name -> phrase).
    prompt_names: dict = field(default_factory=dict, hash=False, compare=False)
    # False where the classes come from the download itself (``folder``: the root folder's name),
    # so ``classes`` is a placeholder and a conversion is never a subset of it.
    fixed_classes: bool = True

