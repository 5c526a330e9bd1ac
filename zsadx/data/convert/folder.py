"""``folder``: a user's own data as ``normal/`` and ``anomalous/`` image folders, masks optional.

``<root>/normal/*``, ``<root>/anomalous/*`` and optionally ``<root>/masks/<stem>[_mask].png``. The
class name is the root folder's name. Everything there is a test image (this is a target dataset).
Optionally ``<root>/train/normal/*``: normal images that form the ``train`` split, the pool the
evaluator draws few-shot references from (``method.shots``); they are never scored.
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


class Folder(DatasetPlugin):
    entry = DatasetEntry(
        name="folder", title="Your own images (normal/ and anomalous/ folders)", domain="any", classes=("<root name>",),
        has_masks=True, aliases=("custom",), splits=("train", "test"),
        layout="  <root>/normal/*.{png,jpg,...}\n  <root>/anomalous/*.{png,jpg,...}\n"
               "  <root>/masks/<stem>[_mask].png   (optional; anomalous images without a mask stay image-level)\n"
               "  <root>/train/normal/*.{png,jpg,...}   (optional; few-shot references, method.shots>0)",
        notes="Class name = the root folder's name. Masks are optional. train/normal/ holds the normal images "
              "few-shot methods draw their references from; without it only shots=0 works.", fixed_classes=False)

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        normal = self.require(root / "normal")
        anomalous = self.require(root / "anomalous")
        cls = root.name
        out = [Candidate(p, 0, cls, "test", specie="normal") for p in list_images(normal)]
        images = list_images(anomalous)
        masks = pair_by_stem(images, list_images(root / "masks"), strip_suffix("_mask"), problems) \
            if (root / "masks").is_dir() else {}
        out += [Candidate(p, 1, cls, "test", mask=masks.get(p), specie="anomalous") for p in images]
        return out + self.references(root, cls)

    def references(self, root: Path, cls: str) -> list[Candidate]:
        """The optional ``train/normal/`` images: the train split few-shot references come from."""
        folder = root / "train" / "normal"
        return [Candidate(p, 0, cls, "train", specie="normal") for p in list_images(folder)] if folder.is_dir() else []

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        planted = []
        for k in range(3 * n):
            for label in (0, 1):
                img, mask = drawing.sample(48, 48, rng, bool(label))
                rel = f"{'anomalous' if label else 'normal'}/img{k}.png"
                drawing.save(root / rel, img)
                has_mask = bool(label and k % 3 != 2)  # one anomalous image without a mask
                if has_mask:
                    drawing.save_mask(root / "masks" / f"img{k}_mask.png", mask)
                planted.append(Planted(rel, label, root.name, has_mask, "test"))
        for k in range(2 * n):  # few-shot references
            rel = f"train/normal/ref{k}.png"
            drawing.save(root / rel, drawing.sample(48, 48, rng, False)[0])
            planted.append(Planted(rel, 0, root.name, False, "train"))
        return planted


PLUGINS.append(Folder())
