"""DAGM 2007 (Kaggle upload): ``ClassK/{Train,Test}/NNNN.PNG`` with ``Label/NNNN_label.PNG`` ellipses.

Three conversions exist in the seeds, offered as variants:

* ``kaggle`` (default; AnomalyCLIP): the Kaggle Test folders are the test set, Train the train
  set; an image is anomalous when a label file with its stem exists.
* ``balanced`` (AdaCLIP): per class and per Train/Test state, all anomalous images go to test plus
  as many normal images, the first ones in sorted order (the official script used the file
  system's listing order, which is not reproducible); the remaining normals go to train.
* ``dra`` (DRA ``data/convert_optical.py``, "Optical"): the normals of all ten classes pooled in the
  script's order (Class1 Train, Class1 Test, Class2 Train, ... each in image-number order, as the
  release's ``Labels.txt`` lists them); test normals = scikit-learn's ``train_test_split(test_size=0.25,
  random_state=42)`` over that one list; every anomalous image is a test image. The split is over
  every class folder the download holds, also when ``--classes`` converts fewer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zsadx.data import drawing
from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import (Candidate, DatasetPlugin, Planted, Problems, list_images, pair_by_stem,
                                     reference_split, strip_suffix)

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
              "(AdaCLIP dagm-pre.py: per class and state all anomalies + as many normals to test, the first in "
              "name order; the script's os.listdir order is not reproducible), dra (DRA convert_optical.py, "
              "verified by running it: the normals of all ten classes pooled in (class, Train/Test, number) "
              "order, test = sklearn train_test_split(test_size=0.25, random_state=42)).")

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        base = self._base(root)
        per_class = {cls: self._states(base, cls, problems) for cls in classes}
        if variant == "balanced":
            for per_state in per_class.values():
                for cands in per_state:
                    _balance(cands)
        elif variant == "dra":
            self._split_pooled(base, per_class)
        return [c for per_state in per_class.values() for cands in per_state for c in cands]

    def _states(self, base: Path, cls: str, problems: Problems) -> list[list[Candidate]]:
        """The candidates of a class, one list per state (Train, Test), in image-number order."""
        cdir = self.require(base / cls)
        per_state = []
        for state in ("Train", "Test"):
            sdir = self.require(cdir / state)
            images = list_images(sdir)
            ldir = sdir / "Label"
            labels = [p for p in list_images(ldir) if p.stem.endswith("_label")] if ldir.is_dir() else []
            pairs = pair_by_stem(images, labels, strip_suffix("_label"), problems)
            per_state.append([Candidate(img, int(m is not None), cls, "test" if state == "Test" else "train",
                                        mask=m, specie="defect" if m is not None else "good")
                              for img, m in pairs.items()])
        return per_state

    def _split_pooled(self, base: Path, per_class: dict[str, list[list[Candidate]]]) -> None:
        """DRA's one split over the normals of every class (classes not converted are listed only)."""
        pooled: list[Candidate] = []
        for cls in self.entry.classes:
            if cls in per_class:
                states = per_class[cls]
            elif (base / cls / "Train").is_dir() and (base / cls / "Test").is_dir():
                states = self._states(base, cls, Problems())  # their problems belong to their own conversion
            else:
                continue
            pooled += [c for cands in states for c in cands]
        _, test = reference_split([c for c in pooled if not c.label], test_size=0.25)
        test_ids = {id(c) for c in test}
        for c in pooled:
            c.split = "test" if (c.label or id(c) in test_ids) else "train"

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


def _balance(cands: list[Candidate]) -> None:
    """AdaCLIP's rule for one state: every anomaly and as many normals (the first ones) to test."""
    n_anomalous = sum(c.label for c in cands)
    for i, c in enumerate([c for c in cands if not c.label]):
        c.split = "test" if i < n_anomalous else "train"
    for c in cands:
        if c.label:
            c.split = "test"


PLUGINS.append(DAGM())
