"""BMAD-derived medical sets with masks: Brain (BraTS2021 slices), Liver CT, Retina OCT (RESC).

Layout ``<Name>_AD/{train/good/img, valid|test/{good,Ungood}/{img,label}}``; MVFA's archives name the
mask folder ``anomaly_mask`` instead of ``label``; both are read. ``good/label`` (all-zero masks) is
ignored: normal images get an empty mask anyway.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zsadx.data import drawing
from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import (Candidate, DatasetPlugin, Planted, Problems, list_images, pair_by_stem,
                                     strip_suffix)

# This module's dataset plug-ins; zsadx.data.convert.plugins registers them.
PLUGINS: list[DatasetPlugin] = []


class BMAD(DatasetPlugin):
    def __init__(self, entry: DatasetEntry, folder: str):
        self.entry, self.folder = entry, folder

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        base = root / self.folder if (root / self.folder).is_dir() else root
        out = []
        (cls,) = self.entry.classes
        train = base / "train" / "good" / "img"
        if train.is_dir():
            out += [Candidate(image=p, label=0, cls=cls, split="train", specie="good") for p in list_images(train)]
        found = False
        for split in ("valid", "test"):
            sdir = base / split
            if not sdir.is_dir():
                continue
            found = True
            for specie, label in (("good", 0), ("Ungood", 1)):
                images = list_images(self.require(sdir / specie / "img"))
                masks = {}
                if label:
                    mdir = sdir / specie / "label"
                    if not mdir.is_dir():
                        mdir = self.require(sdir / specie / "anomaly_mask")
                    masks = pair_by_stem(images, list_images(mdir), strip_suffix(""), problems)
                for img in images:
                    if label and masks.get(img) is None:
                        problems.add(img, "missing mask: no label file with this stem")
                        continue
                    out.append(Candidate(image=img, label=label, cls=cls, split=split, specie=specie,
                                         mask=masks.get(img) if label else None))
        if not found:
            self.require(base / "test")
        return out

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        planted = []
        (cls,) = self.entry.classes
        k = 0
        for split, specie, label in [("train", "good", 0), ("valid", "good", 0), ("valid", "Ungood", 1),
                                     ("test", "good", 0), ("test", "Ungood", 1), ("test", "Ungood", 1)] * n:
            img, mask = drawing.sample(48, 48, rng, bool(label), kind="medical", gray=True)
            stem = f"{k // 3:05d}_{k}"   # volume_slice, as BMAD names them
            rel = Path(self.folder, split, specie, "img", f"{stem}.png")
            drawing.save(root / rel, img, "L")
            if split != "train":  # BMAD also ships all-zero labels for good images
                drawing.save_mask(root / self.folder / split / specie / "label" / f"{stem}.png", mask)
            planted.append(Planted(rel.as_posix(), label, cls, bool(label), split))
            k += 1
        return planted


_LAYOUT = ("  <root>/{f}/train/good/img/*.png\n  <root>/{f}/{{valid,test}}/good/img/*.png\n"
           "  <root>/{f}/{{valid,test}}/Ungood/img/*.png\n"
           "  <root>/{f}/{{valid,test}}/Ungood/label/*.png   (MVFA: anomaly_mask/)")
_SRC = "https://github.com/DorisBao/BMAD"
PLUGINS.append(BMAD(DatasetEntry(
    name="bmad-brain", title="BMAD Brain MRI (BraTS2021 slices)", domain="medical", classes=("brain",),
    has_masks=True, aliases=("brain-bmad", "brats"), splits=("train", "valid", "test"),
    layout=_LAYOUT.format(f="Brain_AD"), source=_SRC, licence="CC BY-NC-SA 4.0 (BMAD)",
    notes="640 normal / 3075 anomalous test images. Reported as 'BrainMRI' by AA-CLIP/ACD-CLIP; not the "
          "Kaggle `brainmri` set.", prompt_names={"brain": "brain MRI scan"}), "Brain_AD"))
PLUGINS.append(BMAD(DatasetEntry(
    name="bmad-liver", title="BMAD Liver CT (BTCV + LiTS)", domain="medical", classes=("liver",), has_masks=True,
    aliases=("liver", "liver-ct"), splits=("train", "valid", "test"), layout=_LAYOUT.format(f="Liver_AD"),
    source=_SRC, licence="CC BY-NC-SA 4.0 (BMAD)", notes="833 normal / 660 anomalous test images."), "Liver_AD"))
PLUGINS.append(BMAD(DatasetEntry(
    name="bmad-retina", title="BMAD Retina OCT (RESC)", domain="medical", classes=("retina",), has_masks=True,
    aliases=("retina", "resc", "retina-oct"), splits=("train", "valid", "test"),
    layout=_LAYOUT.format(f="Retina_RESC_AD"), source=_SRC, licence="CC BY-NC-SA 4.0 (BMAD)",
    notes="1041 normal / 764 anomalous test images."), "Retina_RESC_AD"))
