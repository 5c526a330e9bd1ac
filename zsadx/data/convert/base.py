"""What a dataset plug-in is made of: the plug-in base class, its scan results, shared parsing helpers.

A dataset plug-in only *scans* its raw download into :class:`Candidate` rows (and knows how to
write a synthetic download of the same layout). Everything else -- validation, crops, the summary,
the safe write of the output folder -- is the pipeline's (:mod:`zsadx.data.convert.pipeline`), and
the registry of plug-ins sits above both (:mod:`zsadx.data.convert.plugins`).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from zsadx.data.catalog import DatasetEntry
from zsadx.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# The official loaders (AnomalyCLIP ``dataset.py``, AdaCLIP ``dataset/base_dataset.py``) binarise
# every mask as ``np.array(Image.open(mask).convert('L')) > 0``, JPEG masks (TN3K) included.
OFFICIAL_MASK_THRESHOLD = 0


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
    key: str = ""                                      # the record key where a prepared index gives one


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
    mask_threshold: int = 0  # the dataset's own mask threshold (a plug-in overrides it, e.g. TN3K's 127)

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        """Candidates of ``classes`` (the catalog's, or those chosen with ``--classes``)."""
        raise NotImplementedError

    def class_dir(self, root: Path, cls: str) -> Optional[Path]:
        """The folder holding class ``cls`` in the download, where classes have folders (else None).

        The pipeline uses it to name missing or empty classes before scanning (partial downloads).
        """
        return None

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


def record_key(rel: str, part: str = "") -> tuple[str, str]:
    """(key, source) of the image at ``rel`` (its path relative to the raw root) and piece ``part``.

    The key is the relative path without its extension, so it is stable across machines; a
    prepared index (meta.json, jsonl) naming the same relative path gives the same key.
    """
    source = rel + (f"#{part}" if part else "")
    stem = rel.rsplit(".", 1)[0]
    # WebDataset splits a sample's file names at the first dot: keys must not contain one.
    key = (stem + (f"_{part}" if part else "")).replace(".", "_").replace(" ", "_")
    return key, source


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


def reference_split(items: Sequence, *, test_size: float | None = None, train_size: float | None = None,
                    seed: int = 42) -> tuple[list, list]:
    """(train, test) of ``items`` as scikit-learn's ``train_test_split(..., random_state=seed)`` makes them.

    The reference scripts (DRA's ``data/convert_*.py``, AdaCLIP's ``sdd-pre.py``, anomalib's
    KolektorSDD) all split with it, so zsadx calls it too rather than re-deriving its rounding (the
    test part is ``ceil(test_size * n)``; with ``train_size`` the train part is ``floor(train_size * n)``)
    and its permutation. The split depends on the ORDER of ``items``: callers build the list in the
    reference script's order. Fewer than two items cannot be split (sklearn refuses): all go to test.
    """
    from sklearn.model_selection import train_test_split

    items = list(items)
    if len(items) < 2:
        return [], items
    train_idx, test_idx = train_test_split(list(range(len(items))), test_size=test_size, train_size=train_size,
                                           random_state=seed)
    return [items[i] for i in train_idx], [items[i] for i in test_idx]


def split_normals(normals: Sequence[Candidate], **split_args) -> None:
    """Set ``split`` of each normal candidate by :func:`reference_split` over the list in its given order."""
    train, test = reference_split(range(len(normals)), **split_args)
    for i in train:
        normals[i].split = "train"
    for i in test:
        normals[i].split = "test"
