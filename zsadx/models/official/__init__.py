"""Checkpoint files of the official method repositories, read in memory as zsadx trainable state.

Each module here describes one repository's save format (its key names, nesting, shapes) and
registers an :class:`OfficialFormat`: ``detect`` recognises a loaded file, ``convert`` maps every
tensor onto the zsadx method's trainable keys or lists it as known-dead; any other key is an
error naming it. Shapes decide config values where they can (``n_ctx``, prompt depth/length,
ACD-CLIP's number of levels): a file that disagrees with the method config is an error naming
both values. Files are read with ``weights_only=True`` like every zsadx checkpoint.

:func:`convert_official` is the one entry point (``zsadx.models.checkpoints`` calls it for any
file that is not zsadx's own): it picks the format, converts, and then checks, for every format
alike, the decided config values against the method config and every tensor's shape against the
method's own, casting to the method's dtypes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from zsadx.models.checkpoints import CheckpointError
from zsadx.registry import Registry


@dataclass
class Imported:
    """What a converter made of an official file."""

    state: dict[str, torch.Tensor]                       # zsadx trainable key -> tensor
    dropped: list[str] = field(default_factory=list)     # official keys known to be dead
    decided: dict[str, Any] = field(default_factory=dict)  # config key -> value read off the shapes
    origin: dict[str, str] = field(default_factory=dict)   # zsadx key -> the official key it came from


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
        if info.name != "cli":
            importlib.import_module(f"{__name__}.{info.name}")
    return FORMATS


# ------------------------------------------------------------------------------------------
# Helpers for format modules
# ------------------------------------------------------------------------------------------

def unwrap(obj: Any, outer: str) -> Optional[dict[str, torch.Tensor]]:
    """The state dict of ``{outer: state}`` (how the official code saves) or of a bare state dict;
    None when ``obj`` is neither."""
    if isinstance(obj, dict) and set(obj) == {outer}:
        obj = obj[outer]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    return None


def shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def indexed(sd: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Keys ``prefix.0``, ``prefix.1``, ... in index order; a gap is an error naming it."""
    found = {}
    for k in sd:
        m = re.fullmatch(re.escape(prefix) + r"\.(\d+)", k)
        if m:
            found[int(m.group(1))] = k
    missing = sorted(set(range(len(found))) - set(found))
    if missing:
        raise CheckpointError(f"'{prefix}.{missing[0]}' is missing, but the file has "
                              f"{', '.join(found[i] for i in sorted(found)[:3])}...")
    return [found[i] for i in range(len(found))]


def matching(sd: dict[str, torch.Tensor], patterns: Iterable[str]) -> list[str]:
    """Keys that fully match one of the regular expressions ``patterns``."""
    compiled = [re.compile(p) for p in patterns]
    return [k for k in sd if any(c.fullmatch(k) for c in compiled)]


def refuse_unknown(sd: dict[str, torch.Tensor], accounted: Iterable[str], source: str) -> None:
    """Every key of the file is mapped or dropped; the first other one is an error naming it."""
    rest = [k for k in sd if k not in set(accounted)]
    if rest:
        more = f" (and {len(rest) - 1} more)" if len(rest) > 1 else ""
        raise CheckpointError(f"key '{rest[0]}'{more} is not part of the {source} layout: neither mapped "
                              f"nor known to be dead; a modified fork's file cannot be converted")


def check_width(key: str, t: torch.Tensor, dim: int, want: int, what: str, method) -> None:
    """The file's tensor ``key`` must be ``want`` wide along ``dim`` (a backbone width)."""
    if t.shape[dim] != want:
        raise CheckpointError(
            f"'{key}' {shape(t)} is {t.shape[dim]} wide, the {what} of the backbone it was trained on; "
            f"this method's backbone {method.cfg.backbone.name} has {what} {want}: evaluate it with the "
            f"backbone it was trained for (official: ViT-L-14-336, configs/methods/{method.cfg.name}.yaml)")


def check_eot(key: str, file_ids: torch.Tensor, zsadx_ids: torch.Tensor) -> None:
    """The file's tokenized sentences end (EOT, the largest id) where zsadx's do: the text
    feature is read at that position, so the sentences have the same number of tokens."""
    found = file_ids.reshape(-1, file_ids.shape[-1]).argmax(-1)
    want = zsadx_ids.reshape(-1, zsadx_ids.shape[-1]).argmax(-1)
    if found.numel() != want.numel() or not torch.equal(found.cpu().long(), want.cpu().long()):
        raise CheckpointError(f"'{key}': the file's sentences end at token(s) {found.tolist()}, zsadx's at "
                              f"{want.tolist()}: the file was trained with other prompt sentences")


# ------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------

def detect(obj: Any) -> list[OfficialFormat]:
    """The formats that recognise ``obj``."""
    found = []
    for _, fmt in load_all().items():
        try:
            if fmt.detect(obj):
                found.append(fmt)
        except Exception:  # noqa: BLE001 - a detector that trips over a foreign file did not detect it
            continue
    return found


def convert_official(obj: Any, method) -> Optional[tuple[OfficialFormat, Imported]]:
    """``obj`` (a loaded file) as trainable state of ``method`` if it is an official checkpoint;
    None if no format recognises it. Errors are :class:`CheckpointError` without the file name
    (the caller prefixes it)."""
    found = detect(obj)
    if not found:
        return None
    name = method.cfg.name
    own = [f for f in found if FORMATS.canonical(f.method) == FORMATS.canonical(name)] if name in FORMATS else []
    if not own:
        fmt = found[0]
        raise CheckpointError(f"an official {fmt.method} checkpoint ({fmt.source}), but this is method '{name}'; "
                              f"evaluate it with --method methods/{fmt.method}")
    fmt = own[0]
    imported = fmt.convert(obj, method)
    check_decided(imported, method)
    imported.state = fitted(imported, method)
    return fmt, imported


def check_decided(imported: Imported, method) -> None:
    for key, value in imported.decided.items():
        if not hasattr(method.cfg, key):  # a value a format reports without a config key to hold it
            continue
        have = getattr(method.cfg, key)
        if have != value:
            raise CheckpointError(f"the file's shapes give {key} {value}, the method config has {key} {have}: "
                                  f"set method.{key}={value} (the official run's value)")


def fitted(imported: Imported, method) -> dict[str, torch.Tensor]:
    """The converted state in the method's own keys, shapes and dtypes; a missing key or another
    shape is an error naming the official key it came from."""
    want = method.trainable_state_dict()
    missing = [k for k in want if k not in imported.state]
    if missing:
        raise CheckpointError(f"the file has nothing for {method.cfg.name}'s '{missing[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = {}
    for key, t in imported.state.items():
        if key not in want:
            raise CheckpointError(f"'{imported.origin.get(key, key)}' maps to '{key}', which {method.cfg.name} "
                                  f"does not have (a format module bug, or another method config)")
        if t.shape != want[key].shape:
            raise CheckpointError(f"'{imported.origin.get(key, key)}' {shape(t)} does not fit {method.cfg.name}'s "
                                  f"'{key}' {shape(want[key])} as configured")
        if t.is_floating_point() != want[key].is_floating_point():
            raise CheckpointError(f"'{imported.origin.get(key, key)}' is {t.dtype}, '{key}' is {want[key].dtype}")
        out[key] = t.detach().to(want[key].dtype)
    return out


def describe(fmt: OfficialFormat, imported: Imported) -> str:
    """One line: what was converted, dropped and read off the shapes."""
    groups = sorted({re.sub(r"\.\d+(\.|$)", r".*\1", k) for k in imported.dropped})
    decided = ", ".join(f"{k} {v}" for k, v in imported.decided.items())
    return (f"an official {fmt.method} checkpoint ({fmt.source}), converted in memory: "
            f"{len(imported.state)} tensors mapped, {len(imported.dropped)} dropped as dead or derived "
            f"({', '.join(groups) or 'none'})" + (f"; from the shapes: {decided}" if decided else ""))


__all__ = ["CheckpointError", "FORMATS", "Imported", "OfficialFormat", "check_eot", "check_width", "convert_official",
           "describe", "detect", "indexed", "load_all", "matching", "refuse_unknown", "register", "shape", "unwrap"]
