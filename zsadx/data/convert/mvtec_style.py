"""MVTec-style layouts: ``<class>/{train/<normal>, test/<specie>, ground_truth/<specie>}``.

MVTec AD, MPDD, BTAD, DTD-Synthetic and (assumed) RSDD. The normal specie is ``good`` (BTAD:
``ok``); every other test specie is anomalous and pairs with ``ground_truth/<specie>/<stem>[_mask].*``
by stem, whatever the extensions (BTAD mixes .bmp and .png).
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


class MVTecStyle(DatasetPlugin):
    def __init__(self, entry: DatasetEntry, normal: str = "good", mask_suffix: str = "_mask",
                 subdir: str = "", synth_species: dict[str, tuple[str, ...]] | None = None,
                 synth_ext: dict[str, tuple[str, str]] | None = None, gray: tuple[str, ...] = ()):
        self.entry = entry
        self.normal = normal
        self.mask_suffix = mask_suffix
        self.subdir = subdir
        self.synth_species = synth_species or {}
        self.synth_ext = synth_ext or {}
        self.gray = gray

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        base = self.base(root)
        out = []
        for cls in classes:
            cdir = self.require(base / cls)
            for split in ("train", "test"):
                sdir = cdir / split
                if split == "train" and not sdir.is_dir():
                    continue
                self.require(sdir)
                for specie_dir in sorted(p for p in sdir.iterdir() if p.is_dir()):
                    specie = specie_dir.name
                    images = list_images(specie_dir)
                    anomalous = specie != self.normal
                    if split == "train" and anomalous:
                        problems.add(specie_dir, f"unexpected folder: train/ holds only '{self.normal}'")
                        continue
                    masks: dict = {}
                    if anomalous and self.entry.has_masks:
                        gdir = cdir / "ground_truth" / specie
                        mask_files = list_images(gdir) if gdir.is_dir() else []
                        masks = pair_by_stem(images, mask_files, strip_suffix(self.mask_suffix), problems)
                    for img in images:
                        mask = masks.get(img) if anomalous and self.entry.has_masks else None
                        if anomalous and self.entry.has_masks and mask is None:
                            problems.add(img, "missing mask: no ground_truth file with this stem")
                            continue
                        out.append(Candidate(image=img, label=int(anomalous), cls=cls, split=split,
                                             mask=mask, specie=specie))
        return out

    def class_dir(self, root: Path, cls: str) -> Path:
        return self.base(root) / cls

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        base = root / self.subdir if self.subdir else root
        planted = []
        for cls in self.entry.classes:
            img_ext, mask_ext = self.synth_ext.get(cls, (".png", ".png"))
            gray = cls in self.gray
            species = self.synth_species.get(cls, ("defect",))
            k = 0

            def write(split: str, specie: str, anomalous: bool) -> None:
                nonlocal k
                img, mask = drawing.sample(48, 48, rng, anomalous, gray=gray)
                rel = Path(cls, split, specie, f"{k:03d}{img_ext}")
                drawing.save(base / rel, img, "L" if gray else None)
                if anomalous and self.entry.has_masks:
                    drawing.save_mask(base / cls / "ground_truth" / specie / f"{k:03d}{self.mask_suffix}{mask_ext}", mask)
                planted.append(Planted(source=(Path(self.subdir) / rel).as_posix() if self.subdir else rel.as_posix(),
                                       label=int(anomalous), cls=cls, has_mask=anomalous and self.entry.has_masks,
                                       split=split))
                k += 1

            for _ in range(n):
                write("train", self.normal, False)
                write("test", self.normal, False)
                for specie in species:
                    write("test", specie, True)
        return planted


MVTEC_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                 "screw", "tile", "toothbrush", "transistor", "wood", "zipper")

PLUGINS.append(MVTecStyle(DatasetEntry(
    name="mvtec-ad", title="MVTec AD", domain="industrial", classes=MVTEC_CLASSES, has_masks=True,
    aliases=("mvtec", "mvtecad", "mvtec_anomaly_detection"), splits=("train", "test"),
    layout="  <root>/<class>/train/good/NNN.png\n  <root>/<class>/test/{good,<defect>}/NNN.png\n"
           "  <root>/<class>/ground_truth/<defect>/NNN_mask.png",
    source="https://www.mvtec.com/company/research/datasets/mvtec-ad", licence="CC BY-NC-SA 4.0",
    notes="467 normal / 1258 anomalous test images. grid, screw and zipper are grayscale (read as RGB).",
    prompt_names={"metal_nut": "metal nut"}),
    synth_species={"bottle": ("broken_large", "contamination"), "screw": ("scratch_head",)},
    gray=("grid", "screw", "zipper")))

PLUGINS.append(MVTecStyle(DatasetEntry(
    name="mpdd", title="MPDD (Metal Parts Defect Detection)", domain="industrial",
    classes=("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"),
    has_masks=True, splits=("train", "test"),
    layout="  <root>/<class>/train/good/NNN.png\n  <root>/<class>/test/{good,<defect>}/NNN.png\n"
           "  <root>/<class>/ground_truth/<defect>/NNN_mask.png",
    source="https://github.com/stepanje/MPDD", licence="CC BY-NC-SA 4.0",
    notes="176 normal / 282 anomalous test images.")))

PLUGINS.append(MVTecStyle(DatasetEntry(
    name="btad", title="BTAD (beanTech Anomaly Detection)", domain="industrial", classes=("01", "02", "03"),
    has_masks=True, splits=("train", "test"), aliases=("btech",),
    layout="  <root>/BTech_Dataset_transformed/<01|02|03>/train/ok/*\n"
           "  <root>/BTech_Dataset_transformed/<class>/test/{ok,ko}/*\n"
           "  <root>/BTech_Dataset_transformed/<class>/ground_truth/ko/<stem>.{png,bmp}\n"
           "  (class 01: .bmp images, .png masks; 02: .png; 03: .bmp; masks have no _mask suffix)",
    source="https://avires.dimi.uniud.it/papers/btad/btad.zip", licence="CC BY-SA 4.0",
    notes="451 normal / 290 anomalous test images."),
    normal="ok", mask_suffix="", subdir="BTech_Dataset_transformed",
    synth_species={c: ("ko",) for c in ("01", "02", "03")},
    synth_ext={"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}))

PLUGINS.append(MVTecStyle(DatasetEntry(
    name="dtd-synthetic", title="DTD-Synthetic", domain="industrial",
    classes=("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068", "Woven_125",
             "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069"),
    has_masks=True, splits=("train", "test"), aliases=("dtd",),
    layout="  <root>/<class>/train/good/NNN.png\n  <root>/<class>/test/{good,bad}/NNN.png\n"
           "  <root>/<class>/ground_truth/bad/NNN[_mask].png",
    source="https://drive.google.com/drive/folders/10OyPzvI3H6llCZBxKxFlKWt1Pw1tkMK1", licence="research use",
    notes="Mask file naming is unconfirmed: NNN.png and NNN_mask.png both pair by stem."),
    synth_species={c: ("bad",) for c in ("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099",
                                         "Woven_068", "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114",
                                         "Fibrous_183", "Matted_069")}))

PLUGINS.append(MVTecStyle(DatasetEntry(
    name="rsdd", title="RSDD (as listed by ACD-CLIP)", domain="industrial",
    classes=("Dent", "Crush", "Scratch", "Damage"), has_masks=True, splits=("train", "test"),
    layout="  <root>/<class>/train/good/*.png\n  <root>/<class>/test/{good,<defect>}/*.png\n"
           "  <root>/<class>/ground_truth/<defect>/<stem>[_mask].png   (assumed; see notes)",
    source="unresolved (ACD-CLIP dataset/info.py names data/RSDD with these four classes)",
    notes="UNCONFIRMED layout: ACD-CLIP ships no RSDD metadata; zsadx assumes the MVTec-style layout. "
          "Not the rail-surface RSDD of Gan et al.")))
