"""Image-level datasets (no masks): labels from folder names or from a CSV.

BrainMRI (Kaggle), Br35H, COVID-19 Radiography, LAG (folders); HeadCT, ELPV (CSV). Two split
variants, because the repos disagree: ``all-test`` (every image is a test image, as AnomalyCLIP and
AdaCLIP use them) and ``dra`` (DRA's ``data/convert_*.py``: the test normals are those of scikit-learn's
``train_test_split(test_size=0.25, random_state=42)`` over the normals in the script's order: the
file names of the normal folder (BrainMRI: ``os.listdir``, which zsadx takes in name order) or the
rows of ``labels.csv`` (HeadCT, ELPV)). Br35H, COVID-19 and LAG have no DRA script: their ``dra``
variant applies the BrainMRI rule, a zsadx choice no reference code makes.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from zsadx.data import drawing
from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert.base import Candidate, DatasetPlugin, Planted, Problems, list_images, reference_split

# This module's dataset plug-ins; zsadx.data.convert.plugins registers them.
PLUGINS: list[DatasetPlugin] = []

SPLIT_VARIANTS = ("all-test", "dra")


def assign_splits(items: list[tuple[Path, int, str]], cls: str, variant: str) -> list[Candidate]:
    """(image, label, specie) -> candidates with the variant's split rule applied.

    ``items`` come in the reference script's order (folder listing or CSV rows): the ``dra`` split
    depends on it.
    """
    normals = [i for i in items if i[1] == 0]
    test_normals = set(normals)
    if variant == "dra":
        _, test = reference_split(normals, test_size=0.25)
        test_normals = set(test)
    return [Candidate(image=p, label=lab, cls=cls, specie=sp,
                      split="test" if (lab or (p, lab, sp) in test_normals) else "train")
            for p, lab, sp in items]


class LabelledFolders(DatasetPlugin):
    """``folders`` maps a folder (relative to the root) to its label; other folders are ignored."""

    def __init__(self, entry: DatasetEntry, folders: dict[str, int], subdir: str = "", ignored: tuple[str, ...] = (),
                 synth_ext: tuple[str, ...] = (".jpg",)):
        self.entry, self.folders, self.subdir, self.ignored, self.synth_ext = entry, folders, subdir, ignored, synth_ext

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        base = self.base(root)
        items = []
        for folder, label in self.folders.items():
            d = self.require(base / folder)
            items += [(p, label, folder.split("/")[0]) for p in list_images(d)]
        return assign_splits(items, self.entry.classes[0], variant)

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        base = root / self.subdir if self.subdir else root
        planted = []
        k = 0
        for folder, label in self.folders.items():
            for _ in range(3 * n if label == 0 else 2 * n):
                img, _ = drawing.sample(48, 48, rng, bool(label), kind="medical", gray=True)
                ext = self.synth_ext[k % len(self.synth_ext)]
                rel = Path(folder, f"{'Y' if label else 'N'}{k}{ext}")
                drawing.save(base / rel, img)
                planted.append(Planted(((Path(self.subdir) / rel) if self.subdir else rel).as_posix(), label,
                                       self.entry.classes[0], False))
                k += 1
        for folder in self.ignored:  # folders a real download has that are not part of the set
            img, _ = drawing.sample(48, 48, rng, False, kind="medical")
            drawing.save(base / folder / "unlabelled0.jpg", img)
        return planted


PLUGINS.append(LabelledFolders(DatasetEntry(
    name="brainmri", title="Brain MRI (Kaggle, brain tumour detection)", domain="medical", classes=("brain",),
    has_masks=False, aliases=("brain-mri", "brain_mri", "brainmri2"), variants=SPLIT_VARIANTS,
    default_variant="all-test", splits=("test",),
    layout="  <root>/brain_tumor_dataset/yes/*.{jpg,JPG,png}   (tumour)\n"
           "  <root>/brain_tumor_dataset/no/*.{jpg,JPG,png}    (normal)",
    source="https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection",
    licence="see Kaggle page",
    notes="98 normal / 155 tumour. Not BMAD's Brain set (that one is `bmad-brain`, with masks). "
          "Variant dra (DRA data/convert_BrainMRI.py, verified by running it, listing sorted): sklearn "
          "train_test_split(test_size=0.25, random_state=42) over no/ in name order puts 75% of the normals "
          "into train.",
    prompt_names={"brain": "brain MRI scan"}),
    folders={"no": 0, "yes": 1}, subdir="brain_tumor_dataset", synth_ext=(".jpg", ".JPG", ".png")))

PLUGINS.append(LabelledFolders(DatasetEntry(
    name="br35h", title="Br35H (brain tumour detection 2020)", domain="medical", classes=("brain",), has_masks=False,
    aliases=("br35",), variants=SPLIT_VARIANTS, default_variant="all-test",
    layout="  <root>/yes/*.jpg   (tumour)\n  <root>/no/*.jpg    (normal)\n  (pred/ holds unlabelled images; ignored)",
    source="https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection", licence="see Kaggle page",
    notes="1500 normal / 1500 tumour. Variant dra: no reference script; DRA's BrainMRI rule (sklearn, "
          "test_size=0.25, random_state=42, no/ in name order) applied by zsadx."),
    folders={"no": 0, "yes": 1}, ignored=("pred",)))

PLUGINS.append(LabelledFolders(DatasetEntry(
    name="covid19", title="COVID-19 Radiography (AnomalyCLIP's chest set)", domain="medical", classes=("chest",),
    has_masks=False, aliases=("covid", "chest", "covid-19"), variants=SPLIT_VARIANTS, default_variant="all-test",
    layout="  <root>/COVID-19_Radiography_Dataset/Normal/images/*.png   (normal)\n"
           "  <root>/COVID-19_Radiography_Dataset/COVID/images/*.png    (anomalous)\n"
           "  (Lung_Opacity, Viral Pneumonia and the lung masks/ folders are not used)",
    source="https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database", licence="see Kaggle page",
    notes="Shipped masks are lung masks, not lesion masks: image-level only. AnomalyCLIP used a reorganised "
          "copy; this reads the Kaggle release (Normal vs COVID). Variant dra: no reference script; "
          "DRA's BrainMRI rule applied by zsadx."),
    folders={"Normal/images": 0, "COVID/images": 1}, subdir="COVID-19_Radiography_Dataset",
    ignored=("Lung_Opacity/images",), synth_ext=(".png",)))

PLUGINS.append(LabelledFolders(DatasetEntry(
    name="lag", title="LAG (large-scale attention-based glaucoma)", domain="medical", classes=("LAG",),
    has_masks=False, variants=SPLIT_VARIANTS, default_variant="all-test",
    layout="  <root>/non_glaucoma/image/*.jpg          (normal)\n"
           "  <root>/suspicious_glaucoma/image/*.jpg   (anomalous)",
    source="https://github.com/smilell/AG-CNN (on request)", licence="research use, on request",
    notes="UNCONFIRMED layout (distributed on request; FAPrompt ships no preprocessing). Variant dra: no "
          "reference script; DRA's BrainMRI rule applied by zsadx."),
    folders={"non_glaucoma/image": 0, "suspicious_glaucoma/image": 1}))


class HeadCT(DatasetPlugin):
    entry = DatasetEntry(
        name="headct", title="Head CT (hemorrhage)", domain="medical", classes=("brain",), has_masks=False,
        aliases=("head-ct", "headct2"), variants=SPLIT_VARIANTS, default_variant="all-test",
        layout="  <root>/labels.csv   (id, hemorrhage)\n  <root>/head_ct/head_ct/NNN.png  (or <root>/head_ct/NNN.png)",
        source="https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage", licence="see Kaggle page",
        notes="all-test = 100 normal / 100 hemorrhage (AnomalyCLIP, AdaCLIP headct-pre.py); dra = 25 / 100 "
              "(DRA data/convert_HeadCT.py, verified by running it: sklearn train_test_split(test_size=0.25, "
              "random_state=42) over the normal ids in labels.csv row order).")

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        labels = self.require(root / "labels.csv")
        folder = root / "head_ct" / "head_ct"
        if not folder.is_dir():
            folder = self.require(root / "head_ct")
        by_id = {p.stem: p for p in list_images(folder)}
        items = []
        with open(labels, newline="") as f:
            for row in csv.reader(f):
                if not row or not row[0].strip().isdigit():
                    continue  # header
                ident, flag = row[0].strip(), row[-1].strip()
                path = by_id.get(f"{int(ident):03d}") or by_id.get(ident)
                if path is None:
                    problems.add(folder / f"{int(ident):03d}.png", "missing image: listed in labels.csv")
                    continue
                items.append((path, int(flag), ""))
        return assign_splits(items, "brain", variant)

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        rows, planted = [], []
        for k in range(6 * n):
            label = k % 2
            img, _ = drawing.sample(48, 48, rng, bool(label), kind="medical", gray=True)
            rel = f"head_ct/head_ct/{k:03d}.png"
            drawing.save(root / rel, img)
            rows.append((k, label))
            planted.append(Planted(rel, label, "brain", False))
        with open(root / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", " hemorrhage"])
            w.writerows(rows)
        return planted


class ELPV(DatasetPlugin):
    entry = DatasetEntry(
        name="elpv", title="ELPV (electroluminescence solar cells)", domain="industrial", classes=("elpv",),
        has_masks=False, splits=("train", "test"), variants=("dra",), default_variant="dra",
        layout="  <root>/labels.csv   (whitespace separated: images/cellNNNN.png  probability  type)\n"
               "  <root>/images/cellNNNN.png",
        source="https://github.com/zae-bayern/elpv-dataset", licence="CC BY-NC-SA 4.0",
        notes="DRA data/convert_elpv.py (split verified by running it): probability 0 normal, 1 anomalous, 1/3 "
              "and 2/3 dropped; test normals = sklearn train_test_split(test_size=0.25, random_state=42) over "
              "the normal rows of labels.csv in file order; species mono/poly.")

    def scan(self, root: Path, variant: str, problems: Problems, classes: tuple[str, ...]) -> list[Candidate]:
        labels = self.require(root / "labels.csv")
        items = []
        for line in labels.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            path, prob, kind = root / parts[0], float(parts[1]), parts[2]
            if prob not in (0.0, 1.0):
                continue  # uncertain cells are dropped, as DRA does
            if not path.is_file():
                problems.add(path, "missing image: listed in labels.csv")
                continue
            items.append((path, int(prob == 1.0), kind))
        return assign_splits(items, "elpv", "dra")

    def synthesize(self, root: Path, rng: np.random.Generator, n: int = 1) -> list[Planted]:
        lines, planted = [], []
        for k in range(8 * n):
            prob = [0.0, 1.0, 0.0, 0.3333333333333333][k % 4]
            img, _ = drawing.sample(40, 40, rng, prob > 0, gray=True)
            rel = f"images/cell{k:04d}.png"
            drawing.save(root / rel, img, "L")
            lines.append(f"{rel}  {prob}  {'mono' if k % 2 else 'poly'}")
            if prob in (0.0, 1.0):
                planted.append(Planted(rel, int(prob == 1.0), "elpv", False))
        (root / "labels.csv").write_text("\n".join(lines) + "\n")
        return planted


PLUGINS.append(HeadCT())
PLUGINS.append(ELPV())
