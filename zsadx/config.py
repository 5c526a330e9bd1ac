"""Typed configuration: YAML files composed with ``_base_``, dotted overrides, strict dataclasses.

A config file is plain YAML. ``_base_`` (a path or a list of paths, relative to the file that names
them, or to ``configs/``) lists files whose content is merged first; the file's own keys win, and
nested mappings merge key by key. Command-line overrides such as ``model.layers=[6,12]`` are parsed
as YAML values and applied last.

The merged mapping is turned into dataclasses by :func:`from_dict`, which rejects unknown keys and
wrong types with an error naming the dotted key, the file it came from and the closest valid name.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

from zsadx.errors import UserError
from zsadx.files import atomic_write_text

T = TypeVar("T")

BASE_KEY = "_base_"


class ConfigError(UserError, ValueError):
    """A config file, key or value is wrong; the message names it."""


def config_root() -> Path:
    """The ``configs/`` folder: ``$ZSADX_CONFIG_DIR`` or the one beside the package (editable install)."""
    env = os.environ.get("ZSADX_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------------
# Reading and composing YAML
# --------------------------------------------------------------------------------------------

def resolve_config_path(path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Find a config file: as given, relative to the including file, or under ``configs/``.

    ``methods/winclip`` and ``methods/winclip.yaml`` name the same file.
    """
    raw = Path(path)
    candidates = []
    for base in ([relative_to] if relative_to else []) + [Path.cwd(), config_root()]:
        for p in (raw, raw.with_suffix(raw.suffix or ".yaml")):
            candidates.append(p if p.is_absolute() else base / p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    # Suggest a file that exists under configs/ so a typo in a name is easy to fix.
    known = [str(p.relative_to(config_root()).with_suffix(""))
             for p in config_root().rglob("*.yaml")] if config_root().is_dir() else []
    where = f"{relative_to}, " if relative_to else ""
    raise ConfigError(f"config file not found: '{path}'" + suggest(str(raw.with_suffix("")), known)
                      + f" (searched {where}the current folder and {config_root()})")


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``top`` into ``base``; nested mappings merge, everything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | os.PathLike, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and everything its ``_base_`` entries name, merged."""
    file = resolve_config_path(path, _stack[-1].parent if _stack else None)
    if file in _stack:
        chain = " -> ".join(str(p) for p in _stack + (file,))
        raise ConfigError(f"_base_ cycle: {chain}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{file}: the top level must be a mapping, got {type(data).__name__}")
    return _resolve_bases(data, _stack + (file,))


def _resolve_bases(data: Mapping[str, Any], stack: tuple[Path, ...]) -> dict[str, Any]:
    """Merge the files named by ``_base_`` at this level and in every nested section.

    A nested ``_base_`` composes a section from another file, e.g. ``backbone: {_base_:
    backbones/tiny, image_size: 112}`` reuses a backbone config and changes one key.
    """
    data = dict(data)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, (str, os.PathLike)):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml(base, stack))
    own = {k: _resolve_bases(v, stack) if isinstance(v, Mapping) else v for k, v in data.items()}
    return deep_merge(merged, own)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=[1,2]`` -> (['a', 'b'], [1, 2]); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted overrides. Whether a key exists is checked later, against the dataclass."""
    out = dict(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"override '{text}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------------
# Mapping -> dataclass
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error names the key at fault
            return _convert(value, candidates[0], key)
        for arg in candidates:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"'{key}': {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"'{key}': {value!r} is not one of {list(args)}" + suggest(value, [str(a) for a in args]))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}': expected a section ({tp.__name__}), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            # A single number where a list of numbers is wanted is a common, harmless shorthand
            # (``layers: 24``) that the official CLIs accept too.
            if args and args[0] in (int, float, str) and not isinstance(value, (list, tuple, Mapping)):
                value = [value]
            else:
                raise ConfigError(f"'{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}': expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"'{key}': expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, strictly.

    A field whose metadata holds ``choose_type`` (a callable taking the raw mapping) gets its
    dataclass chosen at load time; this is how ``method:`` picks the config class registered for
    ``method.name``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{prefix or '<root>'}': expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        where = f"{prefix}.{k}" if prefix else k
        raise ConfigError(f"unknown key '{where}' in {cls.__name__}" + suggest(k, fields)
                          + f"; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{key}' in {cls.__name__}")
            continue
        tp = hints[name]
        chooser = field.metadata.get("choose_type")
        if chooser is not None and isinstance(data[name], Mapping):
            tp = chooser(data[name], key)
        kwargs[name] = _convert(data[name], tp, key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain mappings/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                data: Mapping[str, Any] | None = None) -> T:
    """File (and/or mapping) + overrides -> a validated ``cls``. Errors name the file."""
    merged: dict[str, Any] = {}
    if path is not None:
        merged = load_yaml(path)
    if data is not None:
        merged = deep_merge(merged, data)
    merged = apply_overrides(merged, overrides)
    try:
        return from_dict(cls, merged)
    except ConfigError as exc:
        origin = f"{path}: " if path is not None else ""
        raise ConfigError(f"{origin}{exc}") from None


def save_resolved(cfg: Any, folder: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs (atomically)."""
    return atomic_write_text(Path(folder) / name, yaml.safe_dump(to_dict(cfg), sort_keys=False))
