"""Checkpoint files of the official method repositories, read in memory as zsadx trainable state.

Each module here describes one repository's save format (its key names, nesting, shapes) and
registers an :class:`OfficialFormat`: ``detect`` recognises a loaded file, ``convert`` maps every
tensor onto the zsadx method's trainable keys or lists it as known-dead; any other key is an
error naming it. Shapes decide config values where they can (``n_ctx``, prompt depth/length,
ACD-CLIP's number of levels): a file that disagrees with the method config is an error naming
both values. Files are read with ``weights_only=True`` like every zsadx checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from zsadx.models.checkpoints import CheckpointError
from zsadx.registry import Registry


@dataclass
class Imported:
    """What a converter made of an official file."""

    state: dict[str, torch.Tensor]                       # zsadx trainable key -> tensor
    dropped: list[str] = field(default_factory=list)     # official keys known to be dead
    decided: dict[str, Any] = field(default_factory=dict)  # config key -> value read off the shapes


@dataclass(frozen=True)
class OfficialFormat:
    method: str                                          # the zsadx method name
    source: str                                          # repository and save code, for messages
    detect: Callable[[Any], bool]                        # loaded object -> is it this format?
    convert: Callable[[Any, Any], Imported]              # (loaded object, method) -> Imported


FORMATS: Registry = Registry("official checkpoint format")


def register(fmt: OfficialFormat) -> OfficialFormat:
    FORMATS.register(fmt.method, fmt)
    return fmt


def load_all() -> Registry:
    """Import the format modules, which register themselves."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return FORMATS


__all__ = ["CheckpointError", "FORMATS", "Imported", "OfficialFormat", "load_all", "register"]
