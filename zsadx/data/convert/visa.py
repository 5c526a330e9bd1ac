"""VisA: images and masks listed by ``split_csv/1cls.csv`` (the split every ZSAD repo uses)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from zsadx.data import drawing
from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import Candidate, DatasetPlugin, Planted, Problems

# This module's dataset plug-ins; zsadx.data.convert.plugins registers them.
PLUGINS: list[DatasetPlugin] = []

VISA_CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                "pcb3", "pcb4", "pipe_fryum")
_SPLIT_FILES = {"1cls": "1cls.csv", "2cls_fewshot": "2cls_fewshot.csv", "2cls_highshot": "2cls_highshot.csv"}


class VisA(DatasetPlugin):
    entry = DatasetEntry(
        name="visa", title="VisA (Visual Anomaly)", domain="industrial", classes=VISA_CLASSES, has_masks=True,
        splits=("train", "test"), variants=tuple(_SPLIT_FILES), default_variant="1cls",
        layout="  <root>/<class>/Data/Images/{Normal,Anomaly}/NNNN.JPG\n"
               "  <root>/<class>/Data/Masks/Anomaly/NNNN.png\n"
               "  <root>/split_csv/1cls.csv   (object,split,label,image,mask)",
        source="https://github.com/amazon-science/spot-diff", licence="CC BY 4.0",
        notes="Default split 1cls (962 normal / 1200 anomalous test images). Masks store class ids: "
              "anomalous where non-zero.")

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        csv_path = self.require(root / "split_csv" / _SPLIT_FILES[variant])
        out = []
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        need = {"object", "split", "label", "image", "mask"}
        if not rows or not need <= set(rows[0]):
            raise ValueError(f"{csv_path}: expected columns {sorted(need)}, got {sorted(rows[0]) if rows else 'none'}")
        for row in rows:
            cls, label = row["object"], row["label"].strip().lower()
            if cls not in classes:
                continue
            image = root / row["image"]
            if not image.is_file():
                problems.add(image, f"missing image: listed in {csv_path.name}")
                continue
            anomalous = label not in ("normal", "good")
            mask = root / row["mask"] if anomalous and row["mask"] else None
            if anomalous:
                if mask is None or not mask.is_file():
                    problems.add(mask or image, "missing mask: listed image has no mask file")
                    continue
                if mask.stem != image.stem:
                    problems.add(mask, f"mask without image: stem differs from its row's image {image.name}")
                    continue
            split = row["split"].strip().lower()
            out.append(Candidate(image=image, label=int(anomalous), cls=cls, split=split, mask=mask,
                                 specie="Anomaly" if anomalous else "Normal"))
        return out

    def class_dir(self, root: Path, cls: str) -> Path:
        return root / cls

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        rows, planted, k = [], [], 0
        for cls in self.entry.classes:
            for split, anomalous in [("train", False), ("test", False), ("test", True)] * n:
                img, mask = drawing.sample(48, 64, rng, anomalous)
                folder = "Anomaly" if anomalous else "Normal"
                rel = f"{cls}/Data/Images/{folder}/{k:04d}.JPG"
                drawing.save(root / rel, img)
                mrel = ""
                if anomalous:
                    # VisA masks hold class ids (small integers), not 255.
                    mrel = f"{cls}/Data/Masks/Anomaly/{k:04d}.png"
                    drawing.save_mask(root / mrel, mask, value=int(rng.integers(1, 4)))
                rows.append({"object": cls, "split": split, "label": "anomaly" if anomalous else "normal",
                             "image": rel, "mask": mrel})
                planted.append(Planted(rel, int(anomalous), cls, anomalous, split))
                k += 1
        (root / "split_csv").mkdir(parents=True, exist_ok=True)
        with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
            w.writeheader()
            w.writerows(rows)
        return planted


PLUGINS.append(VisA())
