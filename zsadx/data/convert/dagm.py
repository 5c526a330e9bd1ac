"""DAGM 2007 (Kaggle upload): ``ClassK/{Train,Test}/NNNN.PNG`` with ``Label/NNNN_label.PNG`` ellipses.

Three conversions exist in the seeds, offered as variants:

* ``kaggle`` (default; AnomalyCLIP): the Kaggle Test folders are the test set, Train the train
  set; an image is anomalous when a label file with its stem exists.
* ``balanced`` (AdaCLIP): per class and per Train/Test state, all anomalous images go to test plus
  as many normal images, the first ones in sorted order (the official script used the file
  system's listing order, which is not reproducible); the remaining normals go to train.
* ``dra`` (DRA "Optical"): Train and Test pooled; normals split 75/25 train/test (seed 42);
  every anomalous image is a test image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zsadx.data import drawing
from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import (Candidate, DatasetPlugin, Planted, Problems, list_images, pair_by_stem,
                                     seeded_split, strip_suffix)

# This module's dataset plug-ins; zsadx.data.convert.plugins registers them.
PLUGINS: list[DatasetPlugin] = []

DAGM_CLASSES = tuple(f"Class{k}" for k in range(1, 11))


class DAGM(DatasetPlugin):
    entry = DatasetEntry(
        name="dagm", title="DAGM 2007", domain="industrial", classes=DAGM_CLASSES, has_masks=True,
        aliases=("dagm2007", "dagm-kaggleupload"), splits=("train", "test"),
        variants=("kaggle", "balanced", "dra"), default_variant="kaggle",
        layout="  <root>/ClassK/{Train,Test}/NNNN.PNG\n  <root>/ClassK/{Train,Test}/Label/NNNN_label.PNG\n"
               "  (K = 1..10; <root> may also contain a DAGM_KaggleUpload/ folder)",
        source="https://www.kaggle.com/datasets/mhskjelvareid/dagm-2007-competition-dataset-optical-inspection",
        licence="research use",
        notes="Masks are coarse ellipses (weak labels). Variants: kaggle (AnomalyCLIP, default), balanced "
              "(AdaCLIP), dra (DRA pooled 75/25).")

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        base = self._base(root)
        out = []
        for cls in classes:
            cdir = self.require(base / cls)
            per_state = []
            for state in ("Train", "Test"):
                sdir = self.require(cdir / state)
                images = list_images(sdir)
                ldir = sdir / "Label"
                labels = [p for p in list_images(ldir) if p.stem.endswith("_label")] if ldir.is_dir() else []
                pairs = pair_by_stem(images, labels, strip_suffix("_label"), problems)
                cands = [Candidate(img, int(m is not None), cls, "test" if state == "Test" else "train", mask=m,
                                   specie="defect" if m is not None else "good") for img, m in pairs.items()]
                per_state.append(cands)
            if variant == "balanced":
                for cands in per_state:
                    anomalous = [c for c in cands if c.label]
                    normals = [c for c in cands if not c.label]
                    for i, c in enumerate(normals):
                        c.split = "test" if i < len(anomalous) else "train"
                    for c in anomalous:
                        c.split = "test"
            elif variant == "dra":
                pooled = [c for cands in per_state for c in cands]
                normals = [c for c in pooled if not c.label]
                train, _ = seeded_split([str(c.image) for c in normals], 0.25)
                train = set(train)
                for c in pooled:
                    c.split = "train" if (not c.label and str(c.image) in train) else "test"
            out += [c for cands in per_state for c in cands]
        return out

    @staticmethod
    def _base(root: Path) -> Path:
        return root / "DAGM_KaggleUpload" if (root / "DAGM_KaggleUpload").is_dir() else root

    def class_dir(self, root: Path, cls: str) -> Path:
        return self._base(root) / cls

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        planted = []
        for cls in self.entry.classes:
            k = 0
            for state in ("Train", "Test"):
                for label in (0, 0, 1) * n:
                    img, mask = drawing.sample(32, 32, rng, bool(label), gray=True)
                    rel = f"{cls}/{state}/{k:04d}.PNG"
                    drawing.save(root / rel, img, "L")
                    if label:
                        drawing.save_mask(root / cls / state / "Label" / f"{k:04d}_label.PNG", mask)
                    planted.append(Planted(rel, label, cls, bool(label), "test" if state == "Test" else "train"))
                    k += 1
            # Labels.txt as in the release; zsadx pairs by file stem and does not need it.
            for state in ("Train", "Test"):
                (root / cls / state / "Label").mkdir(parents=True, exist_ok=True)
                (root / cls / state / "Label" / "Labels.txt").write_text("1\n")
        return planted


PLUGINS.append(DAGM())
