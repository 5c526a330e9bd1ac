"""The dataset catalog: one registered entry per dataset zsadx knows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from zsadx.registry import Registry

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


# Holds dataset plug-ins (``zsadx.data.convert.base.DatasetPlugin``): an ``entry`` plus the parser
# of the raw layout and the synthetic download of the same layout.
DATASETS: Registry = Registry("dataset")


def get_entry(name: str) -> DatasetEntry:
    return load_all().get(name).entry


def load_all() -> Registry:
    """Import the converters, which register their datasets."""
    import importlib

    try:
        importlib.import_module("zsadx.data.convert")
    except ModuleNotFoundError as exc:
        if exc.name != "zsadx.data.convert":
            raise
    return DATASETS
