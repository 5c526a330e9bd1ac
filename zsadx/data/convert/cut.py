"""Datasets the repos cut into pieces: KolektorSDD (three bands) and AITEX (square tiles).

The pieces are materialised by the conversion pipeline (``Candidate.crop``); a piece is anomalous
when its part of the mask has any anomalous pixel. Normal pieces are split train/test by
scikit-learn's ``train_test_split(test_size=0.25, random_state=42)`` over the list the DRA / AdaCLIP
scripts build (``data/convert_SDD.py``, ``data/convert_AITEX.py``, AdaCLIP's ``sdd-pre.py``): folders,
then files, then pieces, each level in name order. The scripts list with ``os.listdir``, whose order
is the file system's; zsadx sorts by name, which is that order wherever listings come sorted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from zsadx.data import drawing
from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import Candidate, DatasetPlugin, Planted, Problems, list_images, split_normals

# This module's dataset plug-ins; zsadx.data.convert.plugins registers them.
PLUGINS: list[DatasetPlugin] = []


def _read_mask(path: Path, problems: Problems) -> np.ndarray | None:
    """The mask as a grey array, or None with the file reported (the image is then skipped)."""
    try:
        with Image.open(path) as m:
            return np.asarray(m.convert("L"))
    except Exception as exc:  # noqa: BLE001 - any decoder error is bad input, named by its path
        problems.add(path, f"unreadable mask: {exc}")
        return None


def _piece_index(c: Candidate) -> int:
    """The piece's position in its image ('band2' -> 2, 'tile11' -> 11): tiles sort as numbers."""
    return int(c.part.lstrip("abcdefghijklmnopqrstuvwxyz") or 0)


def _split_pieces(cands: list[Candidate], root: Path) -> list[Candidate]:
    """DRA / AdaCLIP rule: the normal pieces in (folder, file, piece) order, 25% test by sklearn."""
    normals = sorted((c for c in cands if not c.label),
                     key=lambda c: (c.image.parent.relative_to(root).as_posix(), c.image.name, _piece_index(c)))
    split_normals(normals, test_size=0.25)
    return cands


def _split_whole(cands: list[Candidate], root: Path) -> list[Candidate]:
    """anomalib's KolektorSDD rule: normal images sorted by path, ``train_size=0.8`` by sklearn."""
    normals = sorted((c for c in cands if not c.label), key=lambda c: c.image.relative_to(root).as_posix())
    split_normals(normals, train_size=0.8)
    return cands


class KolektorSDD(DatasetPlugin):
    entry = DatasetEntry(
        name="sdd", title="KolektorSDD (surface defects on commutators)", domain="industrial", classes=("SDD",),
        has_masks=True, aliases=("kolektorsdd", "ksdd"), splits=("train", "test"),
        variants=("bands", "whole"), default_variant="bands",
        layout="  <root>/kos01 .. kos50/PartN.jpg\n  <root>/kosNN/PartN_label.bmp",
        source="https://www.vicos.si/resources/kolektorsdd/", licence="CC BY-NC-SA 4.0",
        notes="bands (default; DRA data/convert_SDD.py = AdaCLIP sdd-pre.py, used by FAPrompt): each image cut "
              "into 3 horizontal bands by rows, a band is anomalous if its label band is non-empty; normal "
              "bands in (folder, file, band) name order, test = sklearn train_test_split(test_size=0.25, "
              "random_state=42), i.e. ceil(n/4). whole (anomalib KolektorDataset): whole images, normals "
              "sorted by path, train = train_test_split(train_size=0.8, random_state=42), i.e. floor(0.8 n). "
              "Both verified: DRA's script and anomalib's make_kolektor_dataset, run on synthetic downloads, "
              "give the same test normals (the scripts list with os.listdir; zsadx sorts by name, their "
              "order wherever listings come sorted).",
        prompt_names={"SDD": "electrical commutators"})

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("kos"))
        if not folders:
            self.require(root / "kos01")
        out = []
        for d in folders:
            for img in list_images(d, (".jpg", ".png", ".bmp")):
                if img.stem.endswith("_label"):
                    continue
                label_path = next((d / f"{img.stem}_label{e}" for e in (".bmp", ".png")
                                   if (d / f"{img.stem}_label{e}").is_file()), None)
                if label_path is None:
                    problems.add(img, "missing mask: no <stem>_label.bmp")
                    continue
                mask = _read_mask(label_path, problems)
                if mask is None:
                    continue
                h, w = mask.shape
                if variant == "whole":
                    out.append(Candidate(img, int(mask.any()), "SDD", "test", mask=label_path if mask.any() else None,
                                         specie=d.name))
                    continue
                bounds = [0, h // 3, 2 * h // 3, h]
                for b in range(3):
                    band = mask[bounds[b]:bounds[b + 1]]
                    out.append(Candidate(img, int(band.any()), "SDD", "test", mask=label_path if band.any() else None,
                                         specie="defect" if band.any() else "good",
                                         crop=(0, bounds[b], w, bounds[b + 1]), part=f"band{b}"))
        return _split_whole(out, root) if variant == "whole" else _split_pieces(out, root)

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        planted = []
        for k in range(2 * n):
            folder = root / f"kos{k + 1:02d}"
            for part in range(2):
                img = drawing.texture(60, 24, rng, gray=True)
                mask = np.zeros((60, 24), bool)
                defect_band = int(rng.integers(0, 3)) if part == 0 else None
                if defect_band is not None:
                    sub = img[defect_band * 20:(defect_band + 1) * 20]
                    mask[defect_band * 20:(defect_band + 1) * 20] = drawing.paste_defect(sub, rng, 0.2)
                drawing.save(folder / f"Part{part}.jpg", img, "L")
                drawing.save_mask(folder / f"Part{part}_label.bmp", mask)
                for b in range(3):
                    planted.append(Planted(f"kos{k + 1:02d}/Part{part}.jpg#band{b}", int(b == defect_band), "SDD",
                                           b == defect_band))
        return planted


AITEX_DEFECTS = {"002": "Broken_end", "006": "Broken_yarn", "010": "Broken_pick", "016": "Weft_curling",
                 "019": "Fuzzyball", "022": "Cut_selvage", "023": "Crease", "025": "Warp_ball", "027": "Knots",
                 "029": "Contamination", "030": "Nep", "036": "Weft_crack"}


class AITEX(DatasetPlugin):
    entry = DatasetEntry(
        name="aitex", title="AITEX fabric defects", domain="industrial", classes=("AITEX",), has_masks=True,
        splits=("train", "test"),
        layout="  <root>/Defect_images/NNNN_DDD_FF.png\n  <root>/Mask_images/NNNN_DDD_FF_mask.png\n"
               "  <root>/NODefect_images/<fabric>/*.png\n  (each folder may be doubled, e.g. Defect_images/Defect_images/)",
        source="https://www.aitex.es/afid/", licence="research use",
        notes="DRA data/convert_AITEX.py: strips cut into square tiles (side = strip height, 256 px); defect "
              "tiles kept only where the mask tile is non-empty; normal tiles in (folder, file, tile) name "
              "order, test = sklearn train_test_split(test_size=0.25, random_state=42); specie from the "
              "defect code (002 Broken_end ... 036 Weft_crack). Verified: the DRA script run on a synthetic "
              "download (listings sorted) gives the same test tiles.")

    @staticmethod
    def _folder(root: Path, name: str) -> Path:
        d = root / name
        return d / name if (d / name).is_dir() else d

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        defects = self.require(self._folder(root, "Defect_images"))
        masks = self.require(self._folder(root, "Mask_images"))
        normal_root = self.require(self._folder(root, "NODefect_images"))
        out = []
        for img in list_images(defects):
            mpath = masks / f"{img.stem}_mask.png"
            if not mpath.is_file():
                problems.add(img, "missing mask: no Mask_images/<stem>_mask.png")
                continue
            mask = _read_mask(mpath, problems)
            if mask is None:
                continue
            h, w = mask.shape
            code = img.stem.split("_")[1] if img.stem.count("_") >= 2 else ""
            specie = AITEX_DEFECTS.get(code, code or "defect")
            for t in range(w // h):
                if mask[:, t * h:(t + 1) * h].any():
                    out.append(Candidate(img, 1, "AITEX", "test", mask=mpath, specie=specie,
                                         crop=(t * h, 0, (t + 1) * h, h), part=f"tile{t}"))
        for img in sorted(p for p in normal_root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp")):
            try:
                with Image.open(img) as im:
                    w, h = im.size
            except Exception as exc:  # noqa: BLE001
                problems.add(img, f"unreadable image: {exc}")
                continue
            for t in range(w // h):
                out.append(Candidate(img, 0, "AITEX", "test", specie="good", crop=(t * h, 0, (t + 1) * h, h),
                                     part=f"tile{t}"))
        return _split_pieces(out, normal_root)

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        planted = []
        h, w = 24, 96  # strips 4 tiles wide (the real ones are 256 x 4096)
        for k in range(2 * n):
            code = ("002", "019")[k % 2]
            stem = f"{k:04d}_{code}_02"
            img = drawing.texture(h, w, rng, gray=True)
            mask = np.zeros((h, w), bool)
            t = int(rng.integers(0, 4))
            mask[:, t * h:(t + 1) * h] = drawing.paste_defect(img[:, t * h:(t + 1) * h], rng, 0.25)
            drawing.save(root / "Defect_images" / stem[:0] / f"{stem}.png", img, "L")
            drawing.save_mask(root / "Mask_images" / f"{stem}_mask.png", mask)
            planted.append(Planted(f"Defect_images/{stem}.png#tile{t}", 1, "AITEX", True))
        for k in range(n):
            img = drawing.texture(h, w, rng, gray=True)
            rel = f"NODefect_images/2311694-2040n7u/{k:04d}_000_02.png"
            drawing.save(root / rel, img, "L")
            planted += [Planted(f"{rel}#tile{t}", 0, "AITEX", False) for t in range(4)]
        return planted


PLUGINS.append(KolektorSDD())
PLUGINS.append(AITEX())
