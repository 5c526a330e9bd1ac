"""The conversion pipeline shared by every raw layout: scan -> validate -> manifest, written safely.

A dataset plug-in only *scans* its raw download into :class:`Candidate` rows. Everything else happens
here, once: choosing the classes (``--classes``, partial downloads), decoding each image and mask to
catch corrupt files, size checks, checksums, materialising crops for datasets the repos cut into
pieces (SDD bands, AITEX tiles), the summary, and the write of the output folder.

What zsadx may delete (see ``zsadx/files.py``): the output folder carries an ownership marker; a
folder zsadx did not write (and that is not empty) is refused, and ``--out`` may not overlap
``--root``. Re-converting into a folder zsadx wrote replaces only zsadx's own entries there
(``manifest.jsonl``, ``summary.json``, ``derived/``) and keeps anything else a user put there. The
new output is built in a temporary folder inside the output (marked, named by
:func:`zsadx.files.temp_path`) and moved into place at the end, so an interrupted conversion leaves
the previous output as it was; stale temporary folders of killed runs are removed by the next run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import (IMAGE_EXTS, OFFICIAL_MASK_THRESHOLD, Candidate, DatasetPlugin, LayoutError,
                                     Problems, record_key)
from zsadx.data.convert.plugins import class_coverage, get_plugin
from zsadx.data.convert.prepared import IndexFileError, PreparedIndex, open_index, scan_index
from zsadx.data.records import MANIFEST, SUMMARY, Record, file_sha1, mask_threshold_of, write_manifest
from zsadx.data.transforms import ImageError, load_image
from zsadx.errors import UserError
from zsadx.files import FolderLock, is_temp_name, mark_owned, owner_kind, pid_alive, temp_path

log = logging.getLogger(__name__)

OWNER_KIND = "dataset"
TEMP_KIND = "dataset-temp"      # marks the temporary folder of a conversion in progress
DERIVED = "derived"             # crops materialised by the pipeline
OWN_ENTRIES = (MANIFEST, SUMMARY, DERIVED)


class OutputFolderError(UserError):
    """``--out`` is a folder zsadx did not write, or overlaps the raw download."""


# ------------------------------------------------------------------------------------------
# Output folder rules
# ------------------------------------------------------------------------------------------

def check_output_folder(root: Path, out: Path) -> None:
    """Refuse an ``out`` that overlaps ``root`` or that holds files zsadx did not write."""
    if out == root or out.is_relative_to(root):
        raise OutputFolderError(f"--out {out} lies inside --root {root}: zsadx never writes into a raw download; "
                                f"choose an --out folder outside it")
    if root.is_relative_to(out):
        raise OutputFolderError(f"--root {root} lies inside --out {out}: replacing the output could delete the raw "
                                f"images; choose an --out folder that does not contain them")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder; choose a new or empty --out folder")
    kind = owner_kind(out)
    if kind == OWNER_KIND:
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if kind is not None:
        raise OutputFolderError(f"{out}: zsadx wrote this folder as '{kind}', not as a converted dataset; "
                                f"choose another --out folder")
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise OutputFolderError(f"{out}: the folder exists and was not written by `zsadx data convert` (it holds "
                            f"{shown}); zsadx replaces only folders it wrote: choose a new or empty --out folder")


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove temporary folders of killed conversions of ``out``; returns what was removed.

    Called with ``out``'s lock held, so no live conversion of ``out`` owns them. Only folders zsadx
    recognises as its own are removed: marked temp folders inside ``out``, and the unmarked
    ``.<out>.tmp-PID`` / ``.<out>.old-PID`` siblings older versions left, when they hold nothing but
    what a conversion writes and their process is gone.
    """
    removed = []
    for p in out.iterdir():
        if p.is_dir() and is_temp_name(p.name) and owner_kind(p) == TEMP_KIND:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    legacy = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for p in out.parent.iterdir():
        m = legacy.fullmatch(p.name)
        if (m and p.is_dir() and not pid_alive(int(m.group(2)))
                and {c.name for c in p.iterdir()} <= set(OWN_ENTRIES)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in removed:
        log.info("removed the temporary folder of an interrupted conversion: %s", p)
    return removed


def install(tmp: Path, out: Path) -> None:
    """Move the new ``derived/``, manifest and summary from ``tmp`` into ``out``; nothing else is touched.

    The previous ``derived/`` goes into ``tmp`` (deleted with it); the manifest is replaced last
    but one, atomically, so readers see either the old or the new manifest.
    """
    old_derived, new_derived = out / DERIVED, tmp / DERIVED
    if old_derived.exists():
        os.replace(old_derived, tmp / "previous-derived")
    if new_derived.exists():
        os.replace(new_derived, old_derived)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    os.replace(tmp / SUMMARY, out / SUMMARY)


# ------------------------------------------------------------------------------------------
# Classes
# ------------------------------------------------------------------------------------------

def choose_classes(plugin: DatasetPlugin, root: Path, requested: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The classes to convert: ``requested`` (``--classes``) or the catalog's, each present in ``root``.

    A missing or empty class folder is an error that names it and offers ``--classes`` with the
    classes the download does hold.
    """
    entry = plugin.entry
    if not entry.fixed_classes:
        if requested and list(requested) != [root.name]:
            raise OutputFolderError(f"{entry.name}: the class is the --root folder's name '{root.name}'; "
                                    f"--classes does not apply to this dataset")
        return (root.name,)
    unknown = _unknown_class(entry, requested)
    if unknown:
        raise LayoutError(entry.name, entry.layout, root / unknown[0], unknown[1])
    wanted = tuple(c for c in entry.classes if c in set(requested)) if requested else entry.classes
    folders = {c: plugin.class_dir(root, c) for c in wanted}
    if any(d is None for d in folders.values()):
        return wanted
    missing = [c for c, d in folders.items() if not d.is_dir()]
    empty = [c for c, d in folders.items() if d.is_dir() and not _holds_images(d)]
    if not missing and not empty:
        return wanted
    held = [c for c in wanted if c not in missing and c not in empty]
    parts = []
    if missing:
        parts.append(f"missing class folder(s): {', '.join(missing)}")
    if empty:
        parts.append(f"class folder(s) without images: {', '.join(empty)}")
    offer = (f"this download holds {', '.join(held)}: convert those with --classes {','.join(held)}"
             if held else "no class folder holds images")
    raise LayoutError(entry.name, entry.layout, folders[(missing or empty)[0]], "; ".join(parts) + "; " + offer)


def _unknown_class(entry: DatasetEntry, requested: Optional[Sequence[str]]) -> Optional[tuple[str, str]]:
    """(the first ``--classes`` name the catalog does not know, the message), or None."""
    from zsadx.config import suggest

    bad = [c for c in requested or () if c not in entry.classes]
    if not bad:
        return None
    return bad[0], (f"unknown class '{bad[0]}'" + suggest(bad[0], entry.classes)
                    + f"; {entry.name} classes: {', '.join(entry.classes)}")


def choose_index_classes(entry: DatasetEntry, index: PreparedIndex,
                         requested: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The classes to convert from a prepared index: as :func:`choose_classes`, with the index's
    classes in place of the download's class folders."""
    unknown = _unknown_class(entry, requested)
    if unknown:
        raise IndexFileError(f"--classes: {unknown[1]}")
    wanted = tuple(c for c in entry.classes if c in set(requested)) if requested else entry.classes
    held = {r.cls for r in index.rows}
    missing = [c for c in wanted if c not in held]
    if not missing:
        return wanted
    present = [c for c in wanted if c in held]
    offer = (f"it holds {', '.join(present)}: convert those with --classes {','.join(present)}"
             if present else "it holds none of them")
    raise IndexFileError(f"{index.path}: no records of class(es) {', '.join(missing)}; " + offer)


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTS and p.is_file() for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------

def _key(root: Path, c: Candidate) -> tuple[str, str]:
    rel = c.image.relative_to(root).as_posix() if c.image.is_relative_to(root) else c.image.as_posix()
    key, source = record_key(rel, c.part)
    return (c.key or key), source


def _read(path: Path, what: str, keep: bool):
    """(size, the image or None) of an image file; a broken file raises ImageError naming it."""
    im = load_image(path, what)
    return im.size, (im if keep else None)


def _validate(root: Path, out: Path, final_out: Path, entry: DatasetEntry,
              c: Candidate) -> tuple[Optional[Record], Optional[tuple[str, str]]]:
    key, source = _key(root, c)
    try:
        size, img = _read(c.image, "image", keep=bool(c.crop))
    except ImageError as exc:
        return None, (str(c.image), f"unreadable image: {exc.reason}")
    mask_img = None
    if c.mask is not None:
        try:
            msize, mask_img = _read(c.mask, "mask", keep=bool(c.crop))
        except ImageError as exc:
            return None, (str(c.mask), f"unreadable mask: {exc.reason}")
        if msize != size:
            return None, (str(c.mask), f"mask size differs: mask {msize[0]}x{msize[1]} vs image "
                                       f"{size[0]}x{size[1]} ({c.image})")
    image_path, mask_path = c.image, c.mask
    if c.crop:
        derived = out / DERIVED
        image_path = derived / f"{key}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        img.crop(c.crop).save(image_path)
        if mask_img is not None:
            mask_path = derived / f"{key}_mask.png"
            mask_img.convert("L").crop(c.crop).save(mask_path)
        size = (c.crop[2] - c.crop[0], c.crop[3] - c.crop[1])
    rec = Record(key=key, image=str(image_path), label=int(c.label), cls=c.cls, dataset=entry.name,
                 domain=entry.domain, split=c.split, mask=str(mask_path) if mask_path else None,
                 specie=c.specie, width=size[0], height=size[1], source=source,
                 sha1=file_sha1(image_path), mask_sha1=file_sha1(mask_path) if mask_path else "",
                 mask_threshold=c.mask_threshold)
    if c.crop:  # records point at the final location of the derived files
        rec.image = str(final_out / image_path.relative_to(out))
        rec.mask = str(final_out / Path(mask_path).relative_to(out)) if mask_path else None
    return rec, None


# ------------------------------------------------------------------------------------------
# Mask threshold
# ------------------------------------------------------------------------------------------

def choose_mask_threshold(entry: DatasetEntry, mask_threshold: Optional[int], paper_compat: bool) -> Optional[int]:
    """The threshold to impose on every mask (``mask > t`` is anomalous), or None for the dataset's own.

    An explicit ``mask_threshold`` wins; ``paper_compat`` gives the official loaders' value.
    """
    from zsadx.config import ConfigError

    if mask_threshold is None:
        return OFFICIAL_MASK_THRESHOLD if paper_compat else None
    if not entry.has_masks:
        raise ConfigError(f"{entry.name} has no masks: --mask-threshold does not apply; leave it out")
    if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, int) or not 0 <= mask_threshold <= 254:
        raise ConfigError(f"{entry.name}: --mask-threshold {mask_threshold!r} is not a grey level 0..254 "
                          f"(a mask pixel is anomalous where its value is above it)")
    return mask_threshold


def apply_mask_threshold(candidates: Iterable[Candidate], threshold: Optional[int]) -> None:
    if threshold is None:
        return
    for c in candidates:
        c.mask_threshold = threshold


def convert(dataset: str, root: str | os.PathLike | None, out: str | os.PathLike, variant: str | None = None,
            workers: int = 4, progress: bool = True, classes: Optional[Sequence[str]] = None,
            mask_threshold: Optional[int] = None, paper_compat: bool = False,
            index: str | os.PathLike | None = None, index_format: Optional[str] = None,
            hold_out: int = 0, hold_out_seed: int = 0) -> dict:
    """Convert a raw download into ``out/manifest.jsonl`` + ``out/summary.json``; returns the summary.

    ``classes``: convert only these classes of the catalog (a partial download); the summary says
    which classes the output holds. ``mask_threshold``: the grey level above which a mask pixel is
    anomalous (default: the dataset's, 127 for TN3K's JPEG masks, else 0); ``paper_compat``: the
    official loaders' value where ``mask_threshold`` is not given. The records and the summary say
    which threshold the conversion used. ``index``: take the records from a prepared index (AnomalyCLIP's
    meta.json, ACD-CLIP's jsonl; ``index_format`` or detected) instead of scanning the layout; ``root``
    defaults to the folder of a meta.json (:mod:`zsadx.data.convert.prepared`). ``hold_out``: per
    class, move that many readable normal test images (drawn with ``hold_out_seed``) into the
    ``train`` split, the pool few-shot methods draw references from (:func:`hold_out_normals`).
    """
    plugin: DatasetPlugin = get_plugin(dataset)
    entry = plugin.entry
    variant = variant or entry.default_variant
    if variant not in entry.variants:
        from zsadx.config import ConfigError, suggest

        raise ConfigError(f"{entry.name}: unknown variant '{variant}'" + suggest(variant, entry.variants)
                         + f"; variants: {', '.join(entry.variants)}")
    threshold = choose_mask_threshold(entry, mask_threshold, paper_compat)
    if hold_out < 0:
        from zsadx.config import ConfigError

        raise ConfigError(f"--hold-out {hold_out}: a number of normal images per class; use 1 or more (0: none)")
    prepared = open_index(index, index_format, root, entry) if index is not None else None
    if prepared is None and root is None:
        raise IndexFileError(f"{entry.name}: give the raw download with --root, or an index prepared for the "
                             f"official code with --from")
    root = prepared.root if prepared is not None else Path(root).expanduser().resolve()
    if not root.is_dir():
        raise LayoutError(entry.name, entry.layout, root)
    final_out = Path(out).expanduser().resolve()
    check_output_folder(root, final_out)
    problems = Problems()
    if prepared is None:
        wanted = choose_classes(plugin, root, classes)
        candidates = [c for c in plugin.scan(root, variant, problems, wanted) if c.cls in wanted]
    else:
        wanted = choose_index_classes(entry, prepared, classes)
        candidates = scan_index(prepared, problems, wanted, plugin.mask_threshold, entry.has_masks)
    apply_mask_threshold(candidates, threshold)
    if not candidates:
        if prepared is not None:
            raise IndexFileError(f"{prepared.path}: no record of the index could be used "
                                 f"({len(problems.items)} skipped, e.g. {problems.items[0][0]}: {problems.items[0][1]})"
                                 if problems.items else f"{prepared.path}: no records")
        raise LayoutError(entry.name, entry.layout, root, "no images were found under it")
    final_out.mkdir(parents=True, exist_ok=True)
    if owner_kind(final_out) != OWNER_KIND:
        mark_owned(final_out, OWNER_KIND, dataset=entry.name)
    with FolderLock(final_out, "the converted dataset folder"):
        remove_stale_temps(final_out)
        tmp = temp_path(final_out / "convert")
        tmp.mkdir()
        mark_owned(tmp, TEMP_KIND, pid=os.getpid(), host=socket.gethostname())
        try:
            records = _validate_all(root, tmp, final_out, entry, candidates, problems, workers, progress)
            held_out = hold_out_normals(entry.name, records, hold_out, hold_out_seed) if hold_out else None
            for c in wanted:
                if not any(r.cls == c for r in records):
                    problems.add(plugin.class_dir(root, c) or root, f"empty class: no readable image of class '{c}'")
            write_manifest(records, tmp / MANIFEST)
            summary = summarize(entry, variant, root, records, problems, paper_compat=paper_compat)
            if prepared is not None:
                summary["index"] = prepared.describe()
            if held_out is not None:
                summary["held_out"] = {"per_class": hold_out, "seed": hold_out_seed, "keys": held_out}
            (tmp / SUMMARY).write_text(json.dumps(summary, indent=2))
            install(tmp, final_out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _validate_all(root: Path, tmp: Path, final_out: Path, entry: DatasetEntry, candidates: list[Candidate],
                  problems: Problems, workers: int, progress: bool) -> list[Record]:
    from tqdm import tqdm

    records: list[Record] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda c: _validate(root, tmp, final_out, entry, c), candidates)
        for rec, problem in tqdm(results, total=len(candidates), desc=f"convert {entry.name}",
                                 disable=None if progress else True, unit="img"):
            if problem:
                problems.add(*problem)
            else:
                records.append(rec)
    keys = Counter(r.key for r in records)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise ValueError(f"{entry.name}: duplicate keys from the parser, e.g. {dup[:3]}")
    records.sort(key=lambda r: (r.cls, r.split, r.key))
    return records


class HoldOutError(UserError, ValueError):
    """``--hold-out`` asked of a class that cannot give it."""


def hold_out_normals(dataset: str, records: list[Record], count: int, seed: int) -> dict[str, list[str]]:
    """Move ``count`` normal test images of every class into the ``train`` split; returns their keys.

    A dataset without a train split (a lab's own ``normal/`` + ``anomalous/`` folders) then gives
    few-shot methods references that are never scored. The draw is seeded and made over the keys in
    sorted order, so it does not depend on file-system listing order. A class that already has a
    train split, or too few normals to keep one in the test split, is refused by name.
    """
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {}
    for cls in sorted({r.cls for r in records}):
        of_class = [r for r in records if r.cls == cls]
        if any(r.split == "train" for r in of_class):
            raise HoldOutError(f"{dataset}: class '{cls}' already has a train split (e.g. train/normal/); "
                               f"--hold-out is for data without one")
        normals = sorted((r for r in of_class if r.split == "test" and not r.label), key=lambda r: r.key)
        if count >= len(normals):
            raise HoldOutError(f"{dataset}: --hold-out {count} of class '{cls}', which has {len(normals)} normal "
                               f"images; hold out at most {len(normals) - 1} so the test split keeps a normal one")
        picked = sorted(rng.choice(len(normals), size=count, replace=False))
        for i in picked:
            normals[i].split = "train"
        chosen[cls] = [normals[i].key for i in picked]
    records.sort(key=lambda r: (r.cls, r.split, r.key))
    return chosen


def summarize(entry: DatasetEntry, variant: str, root: Path, records: Iterable[Record],
              problems: Problems, paper_compat: bool = False) -> dict:
    """The summary: counts per class, the classes held vs the catalog's (subset), the mask threshold
    used, the problems."""
    records = list(records)
    per_class: dict[str, dict[str, int]] = defaultdict(lambda: Counter())
    for r in records:
        c = per_class[r.cls]
        c[f"{r.split}_{'anomalous' if r.label else 'normal'}"] += 1
        c["masks"] += r.mask is not None
    return {"dataset": entry.name, "variant": variant, "domain": entry.domain, "root": str(root),
            "paper_compat": paper_compat, "mask_threshold": mask_threshold_of(records),
            "images": sum(sum(v for k, v in c.items() if k != "masks") for c in per_class.values()),
            **class_coverage(entry.name, per_class),
            "class_counts": {k: dict(sorted(v.items())) for k, v in sorted(per_class.items())},
            "skipped": len(problems.items), "skipped_by_reason": problems.counts(),
            "problems": [{"path": p, "reason": r} for p, r in problems.items]}


def format_summary(summary: dict) -> str:
    threshold = summary.get("mask_threshold")
    lines = [f"{summary['dataset']} ({summary['variant']}): {summary['images']} images, "
             f"{len(summary['classes'])} classes, {summary['skipped']} skipped"
             + (f", masks cut at > {threshold}" if threshold is not None else "")
             + (" (--paper-compat)" if summary.get("paper_compat") else "")]
    if summary.get("index"):
        lines.append(f"  records from {summary['index']['format']} index {summary['index']['path']}, "
                     f"paths relative to {summary['root']}")
    if summary.get("held_out"):
        h = summary["held_out"]
        lines.append(f"  held out {h['per_class']} normal image(s) per class as the train split (seed {h['seed']}): "
                     f"few-shot references, never scored; keys in summary.json")
    if summary.get("subset"):
        lines.append(f"  a subset: {len(summary['classes'])} of {len(summary['catalog_classes'])} classes "
                     f"(missing {', '.join(summary['missing_classes'])})")
    counts = summary["class_counts"]
    cols = sorted({k for c in counts.values() for k in c})
    lines.append(f"  {'class':24s} " + " ".join(f"{c:>16s}" for c in cols))
    for name, row in counts.items():
        lines.append(f"  {name:24s} " + " ".join(f"{row.get(c, 0):16d}" for c in cols))
    for p in summary["problems"][:20]:
        lines.append(f"  skipped {p['path']}: {p['reason']}")
    if len(summary["problems"]) > 20:
        lines.append(f"  ... and {len(summary['problems']) - 20} more (see summary.json)")
    return "\n".join(lines)
