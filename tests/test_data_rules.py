"""Data rules of issue 17: reference split rules (items 9) and the mask threshold option (item 10).

The reference splits are re-expressed here independently, from the reference scripts' text: build
the list the script builds (its order and all), call scikit-learn's ``train_test_split`` with the
script's arguments, compare with what ``zsadx data convert`` wrote. The counts are also pinned by
hand, where the old rule (``random.Random(42).shuffle``, ``round``) gives another number.
"""
from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from zsadx.cli import main
from zsadx.data.records import read_manifest

# ------------------------------------------------------------------------------------------
# KolektorSDD
# ------------------------------------------------------------------------------------------

SDD_FOLDERS = [f"kos{k:02d}" for k in range(1, 6)]
SDD_PARTS = ["Part0", "Part1", "Part2", "Part10"]           # Part10 sorts before Part2 (name order)
SDD_DEFECTS = {("kos02", "Part1"): 0, ("kos03", "Part10"): 2, ("kos05", "Part0"): 1}  # image -> band


def write_sdd(root: Path) -> None:
    """20 images of 30 x 8 px (bands of 10 rows); 3 hold a defect in one band."""
    rng = np.random.default_rng(0)
    for d in SDD_FOLDERS:
        (root / d).mkdir(parents=True)
        for part in SDD_PARTS:
            Image.fromarray(rng.integers(0, 255, (30, 8), dtype=np.uint8)).save(root / d / f"{part}.jpg")
            label = np.zeros((30, 8), np.uint8)
            band = SDD_DEFECTS.get((d, part))
            if band is not None:
                label[band * 10 + 3: band * 10 + 6, 2:5] = 255
            Image.fromarray(label).save(root / d / f"{part}_label.bmp")


def _label(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def reference_bands_test_normals(root: Path) -> list[str]:
    """DRA data/convert_SDD.py = AdaCLIP sdd-pre.py: folders, then their '*jpg' files, then bands 0..2;
    the normal bands (label band all zero) in that order; train_test_split(test_size=0.25, random_state=42).
    The scripts list with os.listdir; here the listings are taken sorted."""
    normals = []
    for d in sorted(os.listdir(root)):
        for f in sorted(os.listdir(root / d)):
            if not f.endswith("jpg"):
                continue
            label = _label(root / d / (f.split(".")[0] + "_label.bmp"))
            h = label.shape[0]
            for i, (top, bottom) in enumerate([(0, h // 3), (h // 3, h * 2 // 3), (h * 2 // 3, h)]):
                if label[top:bottom].max() == 0:
                    normals.append(f"{d}/{f}#band{i}")
    _, test = train_test_split(normals, test_size=0.25, random_state=42)
    return test


def reference_whole_test_normals(root: Path) -> list[str]:
    """anomalib KolektorDataset: every .jpg sorted by its path string, good = all-zero label,
    train_test_split(good, train_size=0.8, random_state=42)."""
    paths = sorted(str(p) for p in root.glob("**/*") if p.suffix == ".jpg")
    good = [p for p in paths if not _label(Path(p[:-4] + "_label.bmp")).any()]
    _, test = train_test_split(good, train_size=0.8, random_state=42)
    return [Path(p).relative_to(root).as_posix() for p in test]


def _convert(raw: Path, out: Path, dataset: str, *extra: str) -> list:
    assert main(["data", "convert", dataset, "--root", str(raw), "--out", str(out), "--workers", "1", *extra]) == 0
    return read_manifest(out)


def test_sdd_bands_split_is_dra_adaclip_train_test_split(tmp_path):
    write_sdd(tmp_path / "raw")
    recs = _convert(tmp_path / "raw", tmp_path / "out", "sdd")
    normals = [r for r in recs if not r.label]
    # By hand: 60 bands, 3 defective -> 57 normal bands; sklearn tests ceil(57 / 4) = 15 of them
    # (the old round(0.25 n) gave 14).
    assert len(normals) == 57 and sum(r.label for r in recs) == 3
    test = sorted(r.source for r in normals if r.split == "test")
    assert len(test) == 15
    assert test == sorted(reference_bands_test_normals(tmp_path / "raw"))
    assert all(r.split == "test" for r in recs if r.label)


def test_sdd_whole_split_is_anomalibs_kolektor_split(tmp_path):
    write_sdd(tmp_path / "raw")
    recs = _convert(tmp_path / "raw", tmp_path / "out", "sdd", "--variant", "whole")
    normals = [r for r in recs if not r.label]
    # By hand: 17 normal images; train = floor(0.8 * 17) = 13, test = 4 (the old round(0.2 n) gave 3).
    assert len(normals) == 17
    test = sorted(r.source for r in normals if r.split == "test")
    assert len(test) == 4
    assert test == sorted(reference_whole_test_normals(tmp_path / "raw"))


def test_split_depends_on_the_reference_order_not_on_sorted_keys(tmp_path):
    """The reference permutes list positions: the same items in another order give another split,
    so the list order is part of the rule (Part10 sorts between Part1 and Part2 by name)."""
    write_sdd(tmp_path / "raw")
    recs = _convert(tmp_path / "raw", tmp_path / "out", "sdd")
    names = [f"{d}/{p}.jpg#band{b}" for d in SDD_FOLDERS for p in ("Part0", "Part1", "Part2", "Part10")
             for b in range(3) if SDD_DEFECTS.get((d, p)) != b]  # natural order, not name order
    _, natural_test = train_test_split(names, test_size=0.25, random_state=42)
    assert sorted(natural_test) != sorted(r.source for r in recs if not r.label and r.split == "test")


# ------------------------------------------------------------------------------------------
# The other DRA-style variants
# ------------------------------------------------------------------------------------------

def write_headct(root: Path, rows: list[tuple[int, int]]) -> None:
    (root / "head_ct" / "head_ct").mkdir(parents=True)
    for ident, _ in rows:
        Image.fromarray(np.full((8, 8), ident, np.uint8)).save(root / "head_ct" / "head_ct" / f"{ident:03d}.png")
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", " hemorrhage"])
        w.writerows(rows)


def test_headct_dra_split_follows_the_csv_row_order(tmp_path):
    # Rows deliberately not in id order: DRA's convert_HeadCT.py splits the normal ids in row order.
    rows = [(i, int(i % 3 == 0)) for i in (7, 2, 9, 4, 0, 11, 5, 1, 8, 3, 10, 6, 12)]
    write_headct(tmp_path / "raw", rows)
    recs = _convert(tmp_path / "raw", tmp_path / "out", "headct", "--variant", "dra")
    normal_ids = [i for i, flag in rows if flag == 0]
    _, test_ids = train_test_split(normal_ids, normal_ids, test_size=0.25, random_state=42)[:2]
    # By hand: 8 normals -> ceil(8 / 4) = 2 test normals.
    got = sorted(int(Path(r.image).stem) for r in recs if not r.label and r.split == "test")
    assert len(got) == 2 and got == sorted(test_ids)


def write_dagm(root: Path, classes: int = 3, per_state: int = 5) -> None:
    rng = np.random.default_rng(1)
    for k in range(1, classes + 1):
        for state in ("Train", "Test"):
            d = root / f"Class{k}" / state
            (d / "Label").mkdir(parents=True)
            for i in range(per_state):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(d / f"{i:04d}.PNG")
                if i == 1:
                    mask = np.zeros((8, 8), np.uint8)
                    mask[2:5, 2:5] = 255
                    Image.fromarray(mask).save(d / "Label" / f"{i:04d}_label.PNG")


def test_dagm_dra_split_pools_every_class_as_dra_optical(tmp_path):
    write_dagm(tmp_path / "raw")
    # DRA convert_optical.py: one list, Class1 Train, Class1 Test, Class2 Train, ... (number order).
    normals = [f"Class{k}/{s}/{i:04d}.PNG" for k in range(1, 4) for s in ("Train", "Test") for i in range(5) if i != 1]
    _, test = train_test_split(normals, normals, test_size=0.25, random_state=42)[:2]
    recs = _convert(tmp_path / "raw", tmp_path / "out", "dagm", "--variant", "dra", "--classes", "Class1,Class2,Class3")
    got = sorted(r.source for r in recs if not r.label and r.split == "test")
    assert len(got) == 6 and got == sorted(test)  # by hand: 24 normals -> 6
    # Converting one class keeps the pooled split (the rule is over every class of the download).
    one = _convert(tmp_path / "raw", tmp_path / "one", "dagm", "--variant", "dra", "--classes", "Class2")
    assert {r.source: r.split for r in one} == {r.source: r.split for r in recs if r.cls == "Class2"}


# ------------------------------------------------------------------------------------------
# TN3K mask threshold
# ------------------------------------------------------------------------------------------

def write_tn3k(root: Path) -> Path:
    """One JPEG mask: a nodule at 255 with a halo at grey 60 (values around 1..127 after JPEG)."""
    (root / "test-image").mkdir(parents=True)
    (root / "test-mask").mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        root / "test-image" / "1.jpg")
    mask = np.zeros((32, 32), np.uint8)
    mask[4:28, 4:28] = 60
    mask[10:22, 10:22] = 255
    Image.fromarray(mask).save(root / "test-mask" / "1.jpg", quality=90)
    return root / "test-mask" / "1.jpg"


def _shard_mask(shards: Path) -> np.ndarray:
    (tar_name,) = [p for p in shards.iterdir() if p.suffix == ".tar"]
    with tarfile.open(tar_name) as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith(".maskn.png")]
        return np.asarray(Image.open(tar.extractfile(member))) > 0


def _shard(out: Path, shards: Path) -> dict:
    assert main(["data", "shard", str(out), "--out", str(shards), "--size", "original", "--workers", "1"]) == 0
    return json.loads((shards / "index.json").read_text())


def test_tn3k_mask_threshold_option_gives_the_official_mask_and_is_recorded(tmp_path):
    mask_file = write_tn3k(tmp_path / "raw")
    grey = np.asarray(Image.open(mask_file).convert("L"))
    zsadx_mask, official_mask = grey > 127, grey > 0   # the official loaders: convert('L') > 0
    assert ((grey > 0) & (grey <= 127)).sum() > 100 and (official_mask != zsadx_mask).sum() > 100

    (rec,) = _convert(tmp_path / "raw", tmp_path / "default", "tn3k")
    assert rec.mask_threshold == 127
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["mask_threshold"] == 127
    index = _shard(tmp_path / "default", tmp_path / "s1")
    assert [g["mask_threshold"] for g in index["groups"]] == [127]
    assert np.array_equal(_shard_mask(tmp_path / "s1"), zsadx_mask)

    (rec,) = _convert(tmp_path / "raw", tmp_path / "official", "tn3k", "--paper-compat")
    summary = json.loads((tmp_path / "official" / "summary.json").read_text())
    assert rec.mask_threshold == 0 and summary["mask_threshold"] == 0 and summary["paper_compat"] is True
    index = _shard(tmp_path / "official", tmp_path / "s2")
    assert [g["mask_threshold"] for g in index["groups"]] == [0]
    assert np.array_equal(_shard_mask(tmp_path / "s2"), official_mask)

    # An explicit value wins over --paper-compat.
    (rec,) = _convert(tmp_path / "raw", tmp_path / "forty", "tn3k", "--paper-compat", "--mask-threshold", "40")
    assert rec.mask_threshold == 40


def test_reconversion_with_another_threshold_rewrites_the_shard_group(tmp_path):
    """Same keys, other threshold: the group's masks are stale and must be rewritten."""
    write_tn3k(tmp_path / "raw")
    grey = np.asarray(Image.open(tmp_path / "raw" / "test-mask" / "1.jpg").convert("L"))
    _convert(tmp_path / "raw", tmp_path / "out", "tn3k")
    _shard(tmp_path / "out", tmp_path / "shards")
    _convert(tmp_path / "raw", tmp_path / "out", "tn3k", "--mask-threshold", "0")
    index = _shard(tmp_path / "out", tmp_path / "shards")
    assert [g["mask_threshold"] for g in index["groups"]] == [0]
    assert np.array_equal(_shard_mask(tmp_path / "shards"), grey > 0)


@pytest.mark.parametrize("dataset,args,message", [
    ("tn3k", ["--mask-threshold", "255"], "not a grey level 0..254"),
    ("headct", ["--mask-threshold", "0"], "headct has no masks"),
])
def test_bad_mask_threshold_is_a_one_line_error(tmp_path, capsys, dataset, args, message):
    (tmp_path / "raw").mkdir()
    assert main(["data", "convert", dataset, "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and not (tmp_path / "o").exists()
