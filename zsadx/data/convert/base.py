"""The conversion pipeline shared by every raw layout: scan -> validate -> manifest, atomically.

A dataset plug-in only *scans* its raw download into :class:`Candidate` rows (and knows how to
write a synthetic download of the same layout). Everything else happens here, once: decoding each
image and mask to catch corrupt files, size checks, checksums, materialising crops for datasets the
repos cut into pieces (SDD bands, AITEX tiles), the summary, and the atomic write (a temp folder
renamed at the end, so an interrupted conversion never leaves a half-written output).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from zsadx.data.catalog import DATASETS, DatasetEntry
from zsadx.errors import UserError
from zsadx.data.records import MANIFEST, SUMMARY, Record, file_sha1, write_manifest

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class LayoutError(UserError, FileNotFoundError):
    """The raw folder does not have the layout the converter expects."""

    def __init__(self, dataset: str, expected: str, missing: Path | str, hint: str = ""):
        self.missing = Path(missing)
        msg = (f"{dataset}: raw layout not found: '{missing}' does not exist or does not match.\n"
               f"Expected layout:\n{expected}")
        super().__init__(msg + (f"\n{hint}" if hint else ""))


@dataclass
class Candidate:
    """One image the parser found, before validation."""

    image: Path
    label: int
    cls: str
    split: str
    mask: Optional[Path] = None
    specie: str = ""
    crop: Optional[tuple[int, int, int, int]] = None  # (left, top, right, bottom) of a piece
    part: str = ""                                     # name of the piece, e.g. 'band1'
    mask_threshold: int = 0                            # mask > threshold is anomalous (127 for JPEG masks)


@dataclass
class Planted:
    """What a synthetic generator wrote: the converter must find each exactly once."""

    source: str          # image path relative to the raw root (+ '#part' for pieces)
    label: int
    cls: str
    has_mask: bool
    split: Optional[str] = None  # None where the converter decides the split (ad hoc splits)


@dataclass
class Problems:
    """Bad input found during a conversion: reported with paths, skipped, counted."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        self.items.append((str(path), reason))
        log.warning("skipped %s: %s", path, reason)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason.split(":")[0] for _, reason in self.items))


class DatasetPlugin:
    """A dataset: its catalog entry, its raw-layout parser and its synthetic download."""

    entry: DatasetEntry
    subdir: str = ""  # the folder inside the archive's top folder, where a download has one

    def scan(self, root: Path, variant: str, problems: Problems) -> list[Candidate]:
        raise NotImplementedError

    def synthesize(self, root: Path, rng: np.random.Generator) -> list[Planted]:
        raise NotImplementedError

    # -- helpers for parsers ------------------------------------------------------------------
    def base(self, root: Path) -> Path:
        """Accept either the archive's top folder or the folder inside it (``subdir``)."""
        return root / self.subdir if self.subdir and (root / self.subdir).is_dir() else root

    def require(self, path: Path) -> Path:
        """``path`` must exist; otherwise a LayoutError naming it and the expected layout."""
        if not path.exists():
            siblings = sorted(p.name for p in path.parent.iterdir())[:12] if path.parent.is_dir() else []
            hint = f"'{path.parent}' holds: {', '.join(siblings)}" if siblings else ""
            raise LayoutError(self.entry.name, self.entry.layout, path, hint)
        return path


def register(plugin: DatasetPlugin) -> DatasetPlugin:
    DATASETS.register(plugin.entry.name, plugin, aliases=plugin.entry.aliases)
    return plugin


# ------------------------------------------------------------------------------------------
# Shared parsing helpers
# ------------------------------------------------------------------------------------------

def list_images(folder: Path, exts: Sequence[str] = IMAGE_EXTS) -> list[Path]:
    exts = tuple(e.lower() for e in exts)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def pair_by_stem(images: Sequence[Path], masks: Sequence[Path], mask_stem: Callable[[Path], str],
                 problems: Problems) -> dict[Path, Optional[Path]]:
    """Pair each image with the mask whose (normalised) stem equals the image's stem.

    Never by sorted position: a missing or extra mask would shift every later pair (the seeds'
    json generators have this bug). Masks matching no image are reported.
    """
    by_stem = {}
    for m in masks:
        by_stem.setdefault(mask_stem(m), m)
    out: dict[Path, Optional[Path]] = {}
    used = set()
    for img in images:
        m = by_stem.get(img.stem)
        out[img] = m
        if m is not None:
            used.add(m)
    for m in masks:
        if m not in used:
            problems.add(m, "mask without image: no image has the stem " + repr(mask_stem(m)))
    return out


def strip_suffix(suffix: str) -> Callable[[Path], str]:
    def stem(p: Path) -> str:
        s = p.stem
        return s[: -len(suffix)] if suffix and s.endswith(suffix) else s
    return stem


def seeded_split(items: Sequence, test_fraction: float, seed: int = 42) -> tuple[list, list]:
    """Deterministic (train, test) split of sorted items, as the DRA-style scripts make them."""
    items = sorted(items, key=str)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(items) * test_fraction))
    test = set(order[:n_test])
    return ([x for i, x in enumerate(items) if i not in test], [x for i, x in enumerate(items) if i in test])


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------

def _key(root: Path, c: Candidate) -> tuple[str, str]:
    rel = c.image.relative_to(root).as_posix() if c.image.is_relative_to(root) else c.image.as_posix()
    source = rel + (f"#{c.part}" if c.part else "")
    stem = rel.rsplit(".", 1)[0]
    # WebDataset splits a sample's file names at the first dot: keys must not contain one.
    key = (stem + (f"_{c.part}" if c.part else "")).replace(".", "_").replace(" ", "_")
    return key, source


def _validate(root: Path, out: Path, final_out: Path, entry: DatasetEntry,
              c: Candidate) -> tuple[Optional[Record], Optional[tuple[str, str]]]:
    key, source = _key(root, c)
    try:
        with Image.open(c.image) as im:
            im.load()
            size = im.size
            img = im.copy() if c.crop else None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        return None, (str(c.image), f"unreadable image: {type(exc).__name__}: {exc}")
    mask_img = None
    if c.mask is not None:
        try:
            with Image.open(c.mask) as m:
                m.load()
                msize = m.size
                mask_img = m.copy() if c.crop else None
        except Exception as exc:  # noqa: BLE001
            return None, (str(c.mask), f"unreadable mask: {type(exc).__name__}: {exc}")
        if msize != size:
            return None, (str(c.mask), f"mask size differs: mask {msize[0]}x{msize[1]} vs image "
                                       f"{size[0]}x{size[1]} ({c.image})")
    image_path, mask_path = c.image, c.mask
    if c.crop:
        derived = out / "derived"
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


def convert(dataset: str, root: str | os.PathLike, out: str | os.PathLike, variant: str | None = None,
            workers: int = 4, progress: bool = True) -> dict:
    """Convert a raw download into ``out/manifest.jsonl`` + ``out/summary.json``; returns the summary."""
    from tqdm import tqdm

    plugin: DatasetPlugin = DATASETS.get(dataset)
    entry = plugin.entry
    variant = variant or entry.default_variant
    if variant not in entry.variants:
        from zsadx.config import ConfigError, suggest

        raise ConfigError(f"{entry.name}: unknown variant '{variant}'" + suggest(variant, entry.variants)
                         + f"; variants: {', '.join(entry.variants)}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise LayoutError(entry.name, entry.layout, root)
    final_out = Path(out).expanduser().resolve()
    problems = Problems()
    candidates = plugin.scan(root, variant, problems)
    if not candidates:
        raise LayoutError(entry.name, entry.layout, root, "no images were found under it")
    tmp = final_out.parent / f".{final_out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        records: list[Record] = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(lambda c: _validate(root, tmp, final_out, entry, c), candidates)
            for rec, problem in tqdm(results, total=len(candidates), desc=f"convert {entry.name}",
                                     disable=not progress, unit="img"):
                if problem:
                    problems.add(*problem)
                else:
                    records.append(rec)
        keys = Counter(r.key for r in records)
        dup = [k for k, n in keys.items() if n > 1]
        if dup:
            raise ValueError(f"{entry.name}: duplicate keys from the parser, e.g. {dup[:3]}")
        records.sort(key=lambda r: (r.cls, r.split, r.key))
        write_manifest(records, tmp / MANIFEST)
        summary = summarize(entry, variant, root, records, problems)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2))
        if final_out.exists():
            old = final_out.parent / f".{final_out.name}.old-{os.getpid()}"
            os.replace(final_out, old)
            os.replace(tmp, final_out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def summarize(entry: DatasetEntry, variant: str, root: Path, records: Iterable[Record],
              problems: Problems) -> dict:
    per_class: dict[str, dict[str, int]] = defaultdict(lambda: Counter())
    for r in records:
        c = per_class[r.cls]
        c[f"{r.split}_{'anomalous' if r.label else 'normal'}"] += 1
        c["masks"] += r.mask is not None
    return {"dataset": entry.name, "variant": variant, "domain": entry.domain, "root": str(root),
            "images": sum(sum(v for k, v in c.items() if k != "masks") for c in per_class.values()),
            "classes": {k: dict(sorted(v.items())) for k, v in sorted(per_class.items())},
            "skipped": len(problems.items), "skipped_by_reason": problems.counts(),
            "problems": [{"path": p, "reason": r} for p, r in problems.items]}


def format_summary(summary: dict) -> str:
    lines = [f"{summary['dataset']} ({summary['variant']}): {summary['images']} images, "
             f"{len(summary['classes'])} classes, {summary['skipped']} skipped"]
    cols = sorted({k for c in summary["classes"].values() for k in c})
    lines.append(f"  {'class':24s} " + " ".join(f"{c:>16s}" for c in cols))
    for name, counts in summary["classes"].items():
        lines.append(f"  {name:24s} " + " ".join(f"{counts.get(c, 0):16d}" for c in cols))
    for p in summary["problems"][:20]:
        lines.append(f"  skipped {p['path']}: {p['reason']}")
    if len(summary["problems"]) > 20:
        lines.append(f"  ... and {len(summary['problems']) - 20} more (see summary.json)")
    return "\n".join(lines)
