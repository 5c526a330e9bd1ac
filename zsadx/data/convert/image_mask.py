"""Segmentation releases: an image folder and a mask folder, every image anomalous.

CVC-ColonDB, CVC-ClinicDB, Kvasir and CVC-300 (the PraNet/figshare "Polyp DataSet" test folders),
TN3K, EndoTect ("Endo") and ISIC/ISBI 2016. Images and masks pair by stem (ISIC masks add
``_Segmentation``); JPEG masks (TN3K) are cut at mid-grey (> 127) so compression noise is not a
defect; the official loaders cut every mask at > 0, which ``zsadx data convert --paper-compat`` (or
``--mask-threshold 0``) reproduces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from zsadx.data import drawing
from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import (Candidate, DatasetPlugin, Planted, Problems, list_images, pair_by_stem,
                                     strip_suffix)

# This module's dataset plug-ins; zsadx.data.convert.plugins registers them.
PLUGINS: list[DatasetPlugin] = []


class ImageMaskFolders(DatasetPlugin):
    def __init__(self, entry: DatasetEntry, image_dir: Optional[str], mask_dir: str, subdir: str = "",
                 mask_suffix: str = "", mask_threshold: int = 0, exts: tuple[str, str] = (".png", ".png"),
                 synth_image_dir: str = "images"):
        self.entry = entry
        self.image_dir, self.mask_dir, self.subdir = image_dir, mask_dir, subdir
        self.mask_suffix, self.mask_threshold, self.exts = mask_suffix, mask_threshold, exts
        self.synth_image_dir = synth_image_dir

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        base = self.base(root)
        mask_dir = self.require(base / self.mask_dir)
        if self.image_dir is not None:
            image_dirs = [self.require(base / self.image_dir)]
        else:  # EndoTect: every folder but the masks is a specie of images
            image_dirs = sorted(p for p in base.iterdir() if p.is_dir() and p != mask_dir)
            if not image_dirs:
                self.require(base / "<image folder>")
        images = [p for d in image_dirs for p in list_images(d)]
        pairs = pair_by_stem(images, list_images(mask_dir), strip_suffix(self.mask_suffix), problems)
        out = []
        (cls,) = self.entry.classes
        for img, mask in pairs.items():
            if mask is None:
                problems.add(img, "missing mask: no mask with this stem in " + self.mask_dir)
                continue
            out.append(Candidate(image=img, label=1, cls=cls, split="test", mask=mask,
                                 specie=img.parent.name if self.image_dir is None else "",
                                 mask_threshold=self.mask_threshold))
        return out

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        base = root / self.subdir if self.subdir else root
        image_dir = self.image_dir or self.synth_image_dir
        planted = []
        (cls,) = self.entry.classes
        for k in range(3 * n):
            img, mask = drawing.sample(48, 48, rng, True, kind="medical")
            stem = f"{k + 1}" if self.mask_suffix == "" else f"ISIC_{k:07d}"
            rel = Path(image_dir, stem + self.exts[0])
            drawing.save(base / rel, img)
            drawing.save_mask(base / self.mask_dir / f"{stem}{self.mask_suffix}{self.exts[1]}", mask)
            planted.append(Planted(((Path(self.subdir) / rel) if self.subdir else rel).as_posix(), 1, cls, True, "test"))
        return planted


_POLYP_LAYOUT = ("  <root>/{sub}/images/<name>.png\n  <root>/{sub}/masks/<name>.png   (same file name)\n"
                 "  (<root> may also be the {sub} folder itself)")
for name, title, sub, aliases, count in [
    ("cvc-colondb", "CVC-ColonDB", "CVC-ColonDB", ("colondb",), 380),
    ("cvc-clinicdb", "CVC-ClinicDB", "CVC-ClinicDB", ("clinicdb",), 612),
    ("kvasir", "Kvasir-SEG", "Kvasir", ("kvasir-seg",), 1000),
    ("cvc-300", "CVC-300", "CVC-300", ("cvc300",), 60),
]:
    PLUGINS.append(ImageMaskFolders(DatasetEntry(
        name=name, title=title, domain="medical", classes=("colon",), has_masks=True, aliases=aliases,
        layout=_POLYP_LAYOUT.format(sub=sub),
        source="https://github.com/DengPingFan/PraNet (TestDataset)", licence="research use",
        notes=f"{count} images, all anomalous: image-level metrics are undefined (NaN).",
        prompt_names={"colon": "colon endoscopy image"}),
        image_dir="images", mask_dir="masks", subdir=sub))

PLUGINS.append(ImageMaskFolders(DatasetEntry(
    name="tn3k", title="TN3K (thyroid nodule ultrasound)", domain="medical", classes=("thyroid",), has_masks=True,
    layout="  <root>/test-image/NNNN.jpg\n  <root>/test-mask/NNNN.jpg   (JPEG masks)",
    source="https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation", licence="research use",
    notes="614 test images, all anomalous. JPEG masks are binarised at > 127 (compression noise around "
          "the nodule is not a defect); the official loaders (AnomalyCLIP dataset.py, AdaCLIP "
          "base_dataset.py) binarise at > 0: --paper-compat or --mask-threshold 0 gives theirs."),
    image_dir="test-image", mask_dir="test-mask", mask_threshold=127, exts=(".jpg", ".jpg"),
    synth_image_dir="test-image"))

PLUGINS.append(ImageMaskFolders(DatasetEntry(
    name="endo", title="EndoTect 2020 (segmentation test set)", domain="medical", classes=("colon",),
    has_masks=True, aliases=("endotect",),
    layout="  <root>/<image folder(s)>/*.jpg   (every folder but masks/)\n  <root>/masks/<stem>.png",
    source="https://endotect.com", licence="research use",
    notes="200 images, all anomalous. Mask format unconfirmed (pairs by stem, any image format)."),
    image_dir=None, mask_dir="masks", exts=(".jpg", ".png")))

PLUGINS.append(ImageMaskFolders(DatasetEntry(
    name="isic", title="ISIC 2016 / ISBI 2016 Part 1 test", domain="medical", classes=("skin",), has_masks=True,
    aliases=("isbi", "isbi2016"),
    layout="  <root>/ISBI2016_ISIC_Part1_Test_Data/ISIC_NNNNNNN.jpg\n"
           "  <root>/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_NNNNNNN_Segmentation.png",
    source="https://challenge.isic-archive.com/data/#2016", licence="CC BY-NC",
    notes="379 images, all anomalous."),
    image_dir="ISBI2016_ISIC_Part1_Test_Data", mask_dir="ISBI2016_ISIC_Part1_Test_GroundTruth",
    mask_suffix="_Segmentation", exts=(".jpg", ".png")))
