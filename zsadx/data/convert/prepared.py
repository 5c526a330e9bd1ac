"""Datasets prepared for the official code: AnomalyCLIP's ``meta.json`` and ACD-CLIP's jsonl as sources.

Two index formats hold the records the papers' code reads:

- ``meta.json`` (AnomalyCLIP ``generate_dataset_json/*.py`` writes it, ``dataset.py`` reads it; AdaCLIP,
  FAPrompt and their forks read the same file): ``{"train"|"test": {class: [{img_path, mask_path,
  cls_name, specie_name, anomaly}]}}``, paths joined to the folder of ``meta.json``
  (``os.path.join(root, img_path)``, so an absolute path is taken as it is); ``mask_path`` is ``""``
  where there is none.
- ACD-CLIP's ``dataset/hub/<Dataset>.jsonl``: one ``{"image_path", "label", "class_name"[,
  "mask_path"]}`` per line, paths joined to the dataset's data folder (``DATA_PATH`` in
  ``dataset/info.py``), which is not where the jsonl lives: ``--root`` is required. Every line is a
  test image (the file lists the test set only); ``label`` may be written 0.0 / 1.0.

The catalog keeps the dataset's identity (domain, class names, prompts); the index gives only the
records. The repos' processed copies name classes their own way (AdaCLIP's ``br35h``, ``ClinicDB``;
AnomalyCLIP's ``electrical commutators``): :data:`OFFICIAL_CLASS_NAMES` maps them, and a class the
table does not know is an error naming it. Keys come from the image path relative to the root, as
the raw converters make them, so an index of a raw download gives the raw conversion's records;
``zsadx data export-meta`` adds a ``zsadx_key`` field to a row only where the record's key is not
the one its path gives (crops), which the official readers ignore.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import Candidate, Problems, record_key
from zsadx.data.records import SUMMARY, read_manifest
from zsadx.errors import UserError
from zsadx.files import atomic_write_json

META = "meta"
JSONL = "jsonl"
INDEX_FORMATS = (META, JSONL)
KEY_FIELD = "zsadx_key"
META_FIELDS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
JSONL_FIELDS = ("image_path", "label", "class_name")
REPOS = ("anomalyclip", "adaclip", "acd-clip")

# The repos' class names for the processed copies they write, by zsadx dataset and repo:
# official name -> the catalog's class. Names equal to the catalog's need no row. Read from
# AnomalyCLIP generate_dataset_json/*.py, AdaCLIP data_preprocess/*.py, ACD-CLIP dataset/info.py.
OFFICIAL_CLASS_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "sdd": {"anomalyclip": {"electrical commutators": "SDD"}},
    "headct": {"adaclip": {"headct": "brain"}},
    "br35h": {"adaclip": {"br35h": "brain"}},
    "brainmri": {"adaclip": {"brain_mri": "brain"}},
    "isic": {"adaclip": {"isic": "skin"}},
    "cvc-clinicdb": {"adaclip": {"ClinicDB": "colon"}, "acd-clip": {"Colon_clinicDB": "colon"}},
    "cvc-colondb": {"adaclip": {"ColonDB": "colon"}, "acd-clip": {"Colon_colonDB": "colon"}},
    "cvc-300": {"acd-clip": {"CVC-300": "colon"}},
    "kvasir": {"acd-clip": {"Kvasir": "colon"}},
    "endo": {"adaclip": {"endo": "colon"}},
    "tn3k": {"adaclip": {"tn3k": "thyroid"}},
    "bmad-brain": {"acd-clip": {"Brain": "brain"}},
    "bmad-liver": {"acd-clip": {"Liver": "liver"}},
    "bmad-retina": {"acd-clip": {"Retina": "retina"}},
}


class IndexFileError(UserError):
    """A prepared index (meta.json, jsonl) is unreadable, malformed or does not fit the dataset."""


@dataclass
class IndexRow:
    """One record of a prepared index, as written there."""

    image: str
    mask: str
    cls: str
    specie: str
    label: int
    split: str
    where: str          # e.g. "meta.json test/bottle[3]", for messages
    key: str = ""


@dataclass
class PreparedIndex:
    path: Path
    format: str
    root: Path
    rows: list[IndexRow]

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format}


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------

def detect_format(path: Path) -> str:
    """``meta`` for a JSON object with train/test parts, ``jsonl`` for JSON lines; else an error."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and data and set(data) <= {"train", "test", "valid"}:
        return META
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if isinstance(row, dict) and "image_path" in row:
        return JSONL
    raise IndexFileError(f"{path}: neither AnomalyCLIP's meta.json ({{\"train\"|\"test\": {{class: [...]}}}}) nor "
                         f"ACD-CLIP's jsonl (one {{\"image_path\", \"label\", \"class_name\"}} per line); "
                         f"name the format with --from-meta or --from-jsonl")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexFileError(f"{path}: index file not found") from None
    except IsADirectoryError:
        raise IndexFileError(f"{path}: is a folder; give the index file (e.g. ROOT/meta.json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{path}: cannot read the index file ({exc})") from None


def _label(value, where: str, field: str) -> int:
    if value in (0, 1) and not isinstance(value, str):  # 0/1, False/True and 0.0/1.0 as the repos write them
        return int(value)
    raise IndexFileError(f"{where}: '{field}' is {value!r}; expected 0 (normal) or 1 (anomalous)")


def _text(row: dict, field: str, where: str, required: bool = True) -> str:
    value = row.get(field, "")
    if value is None or (not required and value == ""):
        return ""
    if not isinstance(value, str) or (required and not value):
        raise IndexFileError(f"{where}: '{field}' is {value!r}; expected a non-empty path or name")
    return value


def _check_fields(row, fields: Sequence[str], where: str) -> None:
    if not isinstance(row, dict):
        raise IndexFileError(f"{where}: expected a JSON object with {', '.join(fields)}, got {type(row).__name__}")
    missing = [f for f in fields if f not in row]
    if missing:
        raise IndexFileError(f"{where}: missing field(s) {', '.join(missing)} (the format has {', '.join(fields)})")


def _key_of(row: dict, where: str) -> str:
    key = row.get(KEY_FIELD, "")
    if key == "":
        return ""
    if (not isinstance(key, str) or "." in key or key.startswith("/") or any(ch.isspace() for ch in key)
            or "\x00" in key):
        raise IndexFileError(f"{where}: '{KEY_FIELD}' {key!r} is not a record key (no dots, spaces or leading '/')")
    return key


def read_meta(path: Path) -> list[IndexRow]:
    name = path.name
    try:
        data = json.loads(_read_text(path))
    except ValueError as exc:
        raise IndexFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise IndexFileError(f"{path}: expected {{\"train\"|\"test\": {{class: [records]}}}} at the top")
    rows = []
    for split, classes in data.items():
        if split not in ("train", "test", "valid"):
            raise IndexFileError(f"{path}: top-level key '{split}' is not a split (train, test)")
        if not isinstance(classes, dict):
            raise IndexFileError(f"{path}: '{split}' must map class names to lists of records")
        for cls, items in classes.items():
            if not isinstance(items, list):
                raise IndexFileError(f"{path}: {split}/{cls} must be a list of records")
            for i, row in enumerate(items):
                where = f"{name} {split}/{cls}[{i}]"
                _check_fields(row, META_FIELDS, where)
                rows.append(IndexRow(image=_text(row, "img_path", where), mask=_text(row, "mask_path", where, False),
                                     cls=_text(row, "cls_name", where), specie=str(row.get("specie_name") or ""),
                                     label=_label(row["anomaly"], where, "anomaly"), split=split, where=where,
                                     key=_key_of(row, where)))
    return rows


def read_jsonl(path: Path) -> list[IndexRow]:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{i}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise IndexFileError(f"{path}:{i}: not a JSON line ({exc})") from None
        _check_fields(row, JSONL_FIELDS, where)
        label = _label(row["label"], where, "label")
        rows.append(IndexRow(image=_text(row, "image_path", where), mask=_text(row, "mask_path", where, False),
                             cls=_text(row, "class_name", where), specie="anomalous" if label else "normal",
                             label=label, split="test", where=where, key=_key_of(row, where)))
    return rows


def open_index(path: str | os.PathLike, fmt: Optional[str], root: Optional[str | os.PathLike],
               entry: DatasetEntry) -> PreparedIndex:
    """The index at ``path`` (format ``fmt``, or detected), its root, and its rows with catalog class names.

    The root is ``root`` where given, else the folder of a meta.json; a jsonl needs ``root``.
    """
    path = Path(path).expanduser().resolve()
    fmt = fmt or detect_format(path)
    if fmt not in INDEX_FORMATS:
        raise IndexFileError(f"unknown index format '{fmt}'; formats: {', '.join(INDEX_FORMATS)}")
    if not entry.fixed_classes:
        raise IndexFileError(f"{entry.name} takes its class from the --root folder's name; an index names its "
                             f"classes: convert it as the catalog dataset it is (see `zsadx list datasets`)")
    if root is None and fmt == JSONL:
        raise IndexFileError(f"{path}: ACD-CLIP's jsonl paths are relative to the dataset folder, not to the jsonl: "
                             f"give it with --root")
    rows = read_meta(path) if fmt == META else read_jsonl(path)
    if not rows:
        raise IndexFileError(f"{path}: the index lists no records")
    base = Path(root).expanduser().resolve() if root is not None else path.parent
    return PreparedIndex(path, fmt, base, map_classes(rows, entry, path))


# ------------------------------------------------------------------------------------------
# Class names
# ------------------------------------------------------------------------------------------

def class_aliases(dataset: str) -> dict[str, str]:
    """Every repo's name for a class of ``dataset`` -> the catalog's name."""
    out: dict[str, str] = {}
    for names in OFFICIAL_CLASS_NAMES.get(dataset, {}).values():
        out.update(names)
    return out


def official_name(dataset: str, cls: str, repo: Optional[str]) -> str:
    """The name ``repo``'s processed copy gives class ``cls`` of ``dataset`` (the catalog's where it has none)."""
    if repo is None:
        return cls
    for official, ours in OFFICIAL_CLASS_NAMES.get(dataset, {}).get(repo, {}).items():
        if ours == cls:
            return official
    return cls


def map_classes(rows: list[IndexRow], entry: DatasetEntry, path: Path) -> list[IndexRow]:
    aliases = class_aliases(entry.name)
    known = set(entry.classes)
    unknown = sorted({r.cls for r in rows if r.cls not in known and r.cls not in aliases})
    if unknown:
        also = sorted(aliases)
        raise IndexFileError(f"{path}: class name(s) {', '.join(repr(c) for c in unknown)} are not {entry.name} classes "
                             f"({', '.join(entry.classes)}" + (f"; the repos' names {', '.join(also)} are mapped"
                                                               if also else "")
                             + "); is this the index of another dataset?")
    for r in rows:
        if r.cls not in known:  # a catalog name wins over a repo's alias
            r.cls = aliases[r.cls]
    return rows


# ------------------------------------------------------------------------------------------
# Index rows -> candidates
# ------------------------------------------------------------------------------------------

def _locate(root: Path, text: str) -> tuple[Optional[Path], str]:
    """The file ``text`` names (joined to ``root`` as ``os.path.join`` does), or None and why not.

    Lexical, so a dataset whose folders are symbolic links still loads; '..' out of the root and
    absolute paths elsewhere are refused.
    """
    target = Path(os.path.normpath(os.path.join(root, text)))
    if target != root and not target.is_relative_to(root):
        return None, f"outside the root: the index names a path outside {root}"
    return target, ""


def scan_index(index: PreparedIndex, problems: Problems, classes: tuple[str, ...],
               mask_threshold: int, has_masks: bool) -> list[Candidate]:
    """Candidates of ``classes`` from the index; missing files, paths outside the root and duplicate
    paths are reported and skipped. Sizes and decodability are checked by the pipeline."""
    wanted = set(classes)
    seen: dict[Path, str] = {}
    keys: dict[str, str] = {}
    out = []
    for row in index.rows:
        if row.cls not in wanted:
            continue
        cand = _candidate(index.root, row, problems, seen, mask_threshold, has_masks)
        if cand is None:
            continue
        key = cand.key or record_key(cand.image.relative_to(index.root).as_posix())[0]
        if key in keys:  # two paths that differ only where keys cannot ('a.b.png', 'a_b.png')
            problems.add(cand.image, f"duplicate key: '{key}' is also the key of {keys[key]}")
            continue
        keys[key] = row.where
        out.append(cand)
    return out


def _candidate(root: Path, row: IndexRow, problems: Problems, seen: dict[Path, str], mask_threshold: int,
               has_masks: bool) -> Optional[Candidate]:
    image, why = _locate(root, row.image)
    if image is None:
        problems.add(row.image, f"{why} ({row.where})")
        return None
    if image in seen:
        problems.add(image, f"duplicate path: listed at {seen[image]} and again at {row.where}")
        return None
    seen[image] = row.where
    if not image.is_file():
        problems.add(image, f"missing image: listed at {row.where}, not on disk")
        return None
    mask = None
    if row.label and row.mask and has_masks:
        mask, why = _locate(root, row.mask)
        if mask is None:
            problems.add(row.mask, f"{why} ({row.where})")
            return None
        if mask.is_dir():  # AnomalyCLIP's loader: a folder as mask_path means "no mask" (classification only)
            mask = None
        elif not mask.is_file():
            problems.add(mask, f"missing mask: listed at {row.where}, not on disk")
            return None
    return Candidate(image=image, label=row.label, cls=row.cls, split=row.split, mask=mask, specie=row.specie,
                     mask_threshold=mask_threshold, key=row.key)


# ------------------------------------------------------------------------------------------
# Manifest -> meta.json
# ------------------------------------------------------------------------------------------

def export_root(paths: Iterable[Path], given: Optional[Path], default: Optional[Path]) -> Path:
    """The folder the exported paths are relative to: ``given``, else ``default`` (the conversion's
    raw root) where every file lies inside it, else the files' common folder."""
    paths = list(paths)
    for candidate in ([given] if given is not None else [default] if default is not None else []):
        outside = next((p for p in paths if not p.is_relative_to(candidate)), None)
        if outside is None:
            return candidate
        if given is not None:
            raise IndexFileError(f"{outside} lies outside --root {given}; give a --root that holds every image "
                                 f"and mask of the manifest (or leave --root out)")
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def meta_row(rec, root: Path, repo: Optional[str]) -> dict:
    image = Path(rec.image)
    rel = image.relative_to(root).as_posix()
    row = {"img_path": rel, "mask_path": Path(rec.mask).relative_to(root).as_posix() if rec.mask else "",
           "cls_name": official_name(rec.dataset, rec.cls, repo), "specie_name": rec.specie,
           "anomaly": int(rec.label)}
    if record_key(rel)[0] != rec.key:
        row[KEY_FIELD] = rec.key
    return row


def build_meta(records: Sequence, root: Path, repo: Optional[str]) -> tuple[dict, Counter]:
    """(meta.json's object, records left out by split): train and test only, as the official readers expect."""
    meta: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    left_out: Counter = Counter()
    for rec in sorted(records, key=lambda r: (r.split, r.cls, r.key)):
        if rec.split not in meta:
            left_out[rec.split] += 1
            continue
        row = meta_row(rec, root, repo)
        meta[rec.split].setdefault(row["cls_name"], []).append(row)
    return meta, left_out



def export_meta(manifest: str | os.PathLike, out: str | os.PathLike, root: Optional[str | os.PathLike] = None,
                repo: Optional[str] = None) -> dict:
    """Write ``out`` (meta.json) from a zsadx manifest; returns what was written.

    ``root``: the folder the paths are relative to (default: the conversion's raw root where it holds
    every file, else the files' common folder); the official code is then run with that folder as
    the dataset root and ``out`` copied or linked to ``root/meta.json``. ``repo``: write that repo's
    class names (:data:`OFFICIAL_CLASS_NAMES`). An existing ``out`` is never replaced.
    """
    manifest = Path(manifest).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if repo is not None and repo not in REPOS:
        raise IndexFileError(f"unknown repo '{repo}' for class names; choose one of {', '.join(REPOS)}")
    if out.exists():
        raise IndexFileError(f"{out} exists; zsadx does not replace a file it may not have written: choose a new "
                             f"--out path (or move the old file away)")
    try:
        records = read_manifest(manifest)
    except (FileNotFoundError, ValueError) as exc:  # the messages name the file (and line)
        raise IndexFileError(str(exc)) from None
    if not records:
        raise IndexFileError(f"{manifest}: the manifest holds no records")
    files = [Path(p) for r in records for p in (r.image, r.mask) if p]
    given = Path(root).expanduser().resolve() if root is not None else None
    base = export_root(files, given, _conversion_root(manifest))
    meta, left_out = build_meta(records, base, repo)
    atomic_write_json(out, meta, indent=4)
    return {"out": str(out), "root": str(base), "records": len(records) - sum(left_out.values()),
            "left_out": dict(left_out), "classes": sorted({c for part in meta.values() for c in part})}


def _conversion_root(manifest: Path) -> Optional[Path]:
    """The raw root the conversion recorded in summary.json beside the manifest, if any."""
    folder = manifest if manifest.is_dir() else manifest.parent
    try:
        root = json.loads((folder / SUMMARY).read_text()).get("root")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(root) if isinstance(root, str) and root else None
