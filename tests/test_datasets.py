"""Every catalogued dataset: synthetic raw layout -> converter -> manifest equals what was planted."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsadx.data.convert.plugins import load_all
from zsadx.data.convert import LayoutError, convert
from zsadx.data.records import read_manifest
from zsadx.data.synthetic import make_raw

DATASETS = load_all().names()


def test_catalog_has_every_dataset():
    required = {"mvtec-ad", "visa", "elpv", "sdd", "aitex", "btad", "dagm", "dtd-synthetic", "mpdd", "brainmri",
                "headct", "lag", "br35h", "cvc-colondb", "cvc-clinicdb", "kvasir", "endo", "isic", "tn3k",
                "rsdd", "bmad-brain", "bmad-liver", "bmad-retina", "covid19", "cvc-300", "folder"}
    assert required <= set(DATASETS)
    reg = load_all()
    # Kaggle BrainMRI and BMAD Brain are two datasets with two names.
    assert reg.get("brainmri") is not reg.get("bmad-brain")
    assert not reg.get("brainmri").entry.has_masks and reg.get("bmad-brain").entry.has_masks
    assert reg.canonical("mvtec") == "mvtec-ad" and reg.canonical("ksdd") == "sdd"


@pytest.mark.parametrize("name", DATASETS)
def test_synthetic_round_trip(name, tmp_path):
    raw = tmp_path / ("myparts" if name == "folder" else "raw")
    planted = make_raw(name, raw, seed=1)
    summary = convert(name, raw, tmp_path / "out", progress=False, workers=2)
    records = read_manifest(tmp_path / "out")
    assert summary["skipped"] == 0, summary["problems"]
    got = Counter((r.source, r.label, r.cls, r.mask is not None) for r in records)
    want = Counter((p.source, p.label, p.cls, p.has_mask) for p in planted)
    assert got == want  # every planted image arrived exactly once, with label, class and mask
    by_source = {r.source: r for r in records}
    for p in planted:
        if p.split is not None:
            assert by_source[p.source].split == p.split, p.source
    assert all(r.label == 1 or r.mask is None for r in records)
    assert all(r.split in load_all().get(name).entry.splits + ("train", "valid") for r in records)
    assert len({r.key for r in records}) == len(records) and all("." not in r.key for r in records)
    # Masks line up with their images and hold the planted defect.
    for r in records:
        with Image.open(r.image) as im:
            assert im.size == (r.width, r.height)
        if r.mask:
            m = np.asarray(Image.open(r.mask).convert("L"))
            assert m.shape == (r.height, r.width) and (m > r.mask_threshold).any()
    # Conversion is deterministic (ad hoc splits included).
    convert(name, raw, tmp_path / "again", progress=False)
    again = {r.key: r.split for r in read_manifest(tmp_path / "again")}
    assert again == {r.key: r.split for r in records}


def test_ad_hoc_splits_follow_the_documented_rules(tmp_path):
    make_raw("sdd", tmp_path / "sdd", seed=0, n=4)
    recs = read_manifest(Path(convert("sdd", tmp_path / "sdd", tmp_path / "o1", progress=False)["root"]).parent
                         / "o1")
    normals = [r for r in recs if not r.label]
    assert all(r.split == "test" for r in recs if r.label)
    assert sum(r.split == "test" for r in normals) == math.ceil(0.25 * len(normals))  # sklearn rounds up
    make_raw("headct", tmp_path / "h", seed=0, n=4)
    allt = read_manifest(Path(convert("headct", tmp_path / "h", tmp_path / "h1", progress=False)["root"]).parent / "h1")
    assert all(r.split == "test" for r in allt)
    dra = convert("headct", tmp_path / "h", tmp_path / "h2", variant="dra", progress=False)
    recs = read_manifest(tmp_path / "h2")
    n = sum(not r.label for r in recs)
    assert sum(r.split == "test" and not r.label for r in recs) == math.ceil(0.25 * n)
    assert dra["variant"] == "dra"
    make_raw("dagm", tmp_path / "d", seed=0, n=2)
    bal = read_manifest(Path(convert("dagm", tmp_path / "d", tmp_path / "d1", variant="balanced",
                                     progress=False)["root"]).parent / "d1")
    for cls in {r.cls for r in bal}:
        test = [r for r in bal if r.cls == cls and r.split == "test"]
        assert sum(r.label for r in test) == sum(1 - r.label for r in test)
    with pytest.raises(ValueError, match="unknown variant 'balancd'.*did you mean 'balanced'"):
        convert("dagm", tmp_path / "d", tmp_path / "d2", variant="balancd", progress=False)


def test_visa_masks_with_class_ids_are_anomalous(tmp_path):
    make_raw("visa", tmp_path / "v", seed=0)
    convert("visa", tmp_path / "v", tmp_path / "o", progress=False)
    rec = next(r for r in read_manifest(tmp_path / "o") if r.mask)
    m = np.asarray(Image.open(rec.mask))
    assert 0 < m.max() < 5  # class ids, not 255: anomalous where non-zero


# ---- bad input ----------------------------------------------------------------------------

def test_missing_folder_names_layout_and_path(tmp_path):
    make_raw("mvtec-ad", tmp_path / "raw")
    import shutil

    shutil.rmtree(tmp_path / "raw" / "screw")
    with pytest.raises(LayoutError) as err:
        convert("mvtec-ad", tmp_path / "raw", tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "screw" in msg and "ground_truth/<defect>/NNN_mask.png" in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(LayoutError, match="nowhere"):
        convert("visa", tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_misnamed_folder(tmp_path):
    make_raw("tn3k", tmp_path / "raw")
    (tmp_path / "raw" / "test-mask").rename(tmp_path / "raw" / "test_mask")
    with pytest.raises(LayoutError, match="test-mask.*\n.*Expected layout") as err:
        convert("tn3k", tmp_path / "raw", tmp_path / "out", progress=False)
    assert "test_mask" in str(err.value)  # the hint lists what is there


def test_corrupt_truncated_mismatched_and_orphans_are_skipped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    make_raw("mvtec-ad", raw)
    bottle = raw / "bottle" / "test"
    anomalous = sorted((bottle / "broken_large").iterdir())[0]
    (bottle / "good" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = sorted((bottle / "good").glob("0*.png"))[0]
    data = good.read_bytes()
    (bottle / "good" / "truncated.png").write_bytes(data[: len(data) // 2])
    # A mask whose size differs from its image.
    mask = raw / "bottle" / "ground_truth" / "broken_large" / f"{anomalous.stem}_mask.png"
    Image.new("L", (10, 10), 255).save(mask)
    # A mask without an image.
    Image.new("L", (48, 48), 255).save(raw / "bottle" / "ground_truth" / "contamination" / "999_mask.png")
    summary = convert("mvtec-ad", raw, tmp_path / "out", progress=False)
    reasons = summary["skipped_by_reason"]
    assert reasons == {"unreadable image": 2, "mask size differs": 1, "mask without image": 1}
    paths = {p["path"] for p in summary["problems"]}
    assert str(bottle / "good" / "corrupt.png") in paths and str(mask) in paths
    keys = {r.source for r in read_manifest(tmp_path / "out")}
    assert "bottle/test/good/truncated.png" not in keys and len(keys) == summary["images"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"] == 4


def test_interrupted_conversion_leaves_previous_output(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    make_raw("kvasir", raw)
    convert("kvasir", raw, tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "manifest.jsonl").read_text()
    from zsadx.data.convert import pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "summarize", boom)
    make_raw("kvasir", raw, seed=5)  # more images, then the conversion dies before the rename
    with pytest.raises(KeyboardInterrupt):
        convert("kvasir", raw, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert [p.name for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name] == []


def test_cli_convert_prints_summary(tmp_path, capsys):
    from zsadx.cli import main

    assert main(["data", "synth", "btad", "--root", str(tmp_path / "raw")]) == 0
    assert main(["data", "convert", "btad", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "btad (default): 9 images, 3 classes, 0 skipped" in out
    assert main(["data", "convert", "btadd", "--root", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'btad'" in capsys.readouterr().err
    assert main(["data", "info", "dagm"]) == 0
