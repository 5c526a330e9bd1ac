"""Datasets prepared for the official code (issue 18, part 2): meta.json / jsonl in, meta.json out.

The indexes are written here by independent re-expressions of the official writers (AnomalyCLIP
``generate_dataset_json/mvtec.py``: species folders listed, names sorted, masks paired by sorted
position, ``mask_path`` "" for normal images; ACD-CLIP ``dataset/hub/*.jsonl``: test images only,
``label`` as 0.0 / 1.0, ``mask_path`` on anomalous lines only), over synthetic raw downloads.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, run_cli
from zsadx.cli import main
from zsadx.data import drawing
from zsadx.data.records import read_manifest
from zsadx.data.synthetic import make_raw

CLASSES = ("bottle", "screw")


run = run_cli


def anomalyclip_meta(root: Path, classes=CLASSES) -> dict:
    """meta.json as AnomalyCLIP's MVTecSolver writes it for ``root``."""
    info = {"train": {}, "test": {}}
    for cls in classes:
        for phase in ("train", "test"):
            rows = []
            for specie in os.listdir(root / cls / phase):
                abnormal = specie != "good"
                names = sorted(os.listdir(root / cls / phase / specie))
                masks = sorted(os.listdir(root / cls / "ground_truth" / specie)) if abnormal else None
                for i, name in enumerate(names):
                    rows.append({"img_path": f"{cls}/{phase}/{specie}/{name}",
                                 "mask_path": f"{cls}/ground_truth/{specie}/{masks[i]}" if abnormal else "",
                                 "cls_name": cls, "specie_name": specie, "anomaly": 1 if abnormal else 0})
            info[phase][cls] = rows
    return info


def acd_jsonl(root: Path, classes=CLASSES) -> list[dict]:
    """ACD-CLIP's hub jsonl of the test images under ``root``."""
    lines = []
    for cls in classes:
        for img in sorted((root / cls / "test").rglob("*.png")):
            specie = img.parent.name
            row = {"image_path": img.relative_to(root).as_posix(), "label": 0.0 if specie == "good" else 1.0,
                   "class_name": cls}
            if specie != "good":
                row["mask_path"] = f"{cls}/ground_truth/{specie}/{img.stem}_mask.png"
            lines.append(row)
    return lines


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=4))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def mvtec(tmp_path) -> Path:
    root = tmp_path / "mvtec"
    make_raw("mvtec-ad", root)
    return root


def convert_raw(capsys, root: Path, out: Path, *extra) -> list:
    rc, _, err = run(capsys, "data", "convert", "mvtec-ad", "--root", root, "--out", out, "--workers", "1",
                     "--classes", ",".join(CLASSES), *extra)
    assert rc == 0, err
    return read_manifest(out)


def convert_index(capsys, out: Path, *source, dataset="mvtec-ad", classes=CLASSES):
    extra = ("--classes", ",".join(classes)) if classes else ()
    return run(capsys, "data", "convert", dataset, *source, "--out", out, "--workers", "1", *extra)


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--from-meta", "--from"])
def test_official_meta_json_gives_the_raw_conversion_records(mvtec, tmp_path, capsys, option):
    raw = convert_raw(capsys, mvtec, tmp_path / "raw-out")
    meta = write_json(mvtec / "meta.json", anomalyclip_meta(mvtec))
    rc, out, err = convert_index(capsys, tmp_path / "meta-out", option, meta)
    assert rc == 0, err
    got = read_manifest(tmp_path / "meta-out")
    assert got == raw                                       # keys, splits, masks, species, checksums, sizes
    assert {r.dataset for r in got} == {"mvtec-ad"} and {r.domain for r in got} == {"industrial"}
    summary = json.loads((tmp_path / "meta-out" / "summary.json").read_text())
    assert summary["index"] == {"path": str(meta), "format": "meta"}
    assert "records from meta index" in out


@pytest.mark.parametrize("option", ["--from-jsonl", "--from"])
def test_acd_clip_jsonl_gives_the_test_records(mvtec, tmp_path, capsys, option):
    raw = [r for r in convert_raw(capsys, mvtec, tmp_path / "raw-out") if r.split == "test"]
    hub = write_jsonl(tmp_path / "MVTec.jsonl", acd_jsonl(mvtec))       # beside, not inside, the data folder
    rc, _, err = convert_index(capsys, tmp_path / "jsonl-out", option, hub, "--root", mvtec)
    assert rc == 0, err
    got = read_manifest(tmp_path / "jsonl-out")
    # the jsonl names no species: normal / anomalous, as the folder source does
    assert {r.specie for r in got} == {"normal", "anomalous"}
    strip = lambda rs: [dataclasses.replace(r, specie="") for r in rs]  # noqa: E731
    assert strip(got) == strip(raw)


def test_jsonl_needs_root_one_line(mvtec, tmp_path, capsys):
    hub = write_jsonl(tmp_path / "MVTec.jsonl", acd_jsonl(mvtec))
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-jsonl", hub)
    assert rc == 2 and "--root" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_file_in_neither_format_is_one_line_naming_it(tmp_path, capsys):
    other = write_json(tmp_path / "other.json", {"images": []})
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from", other)
    line = one_error_line(err)
    assert rc == 2 and str(other) in line and "--from-meta" in line


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["test"]["bottle"][0].pop("img_path"), "missing field(s) img_path"),
    (lambda m: m["test"]["bottle"][0].update(anomaly="yes"), "'anomaly' is 'yes'"),
    (lambda m: m.update(val={}), "'val' is not a split"),
    (lambda m: m["test"].update(bottle={"a": 1}), "test/bottle must be a list"),
])
def test_malformed_meta_json_is_one_line_naming_the_row(mvtec, tmp_path, capsys, edit, expected):
    meta = anomalyclip_meta(mvtec)
    edit(meta)
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-meta", write_json(mvtec / "meta.json", meta))
    line = one_error_line(err)
    assert rc == 2 and expected in line and "meta.json" in line


def test_missing_files_wrong_size_masks_duplicates_and_escapes_are_reported(mvtec, tmp_path, capsys):
    meta = anomalyclip_meta(mvtec)
    bottle = meta["test"]["bottle"]
    anomalous = [r for r in bottle if r["anomaly"]]
    Image.new("L", (20, 20)).save(mvtec / anomalous[0]["mask_path"])            # wrong size
    normal = next(r for r in bottle if not r["anomaly"])
    bottle.append(dict(normal))                                                 # duplicate path
    meta["train"]["screw"].append({"img_path": "screw/train/good/999.png", "mask_path": "", "cls_name": "screw",
                                   "specie_name": "good", "anomaly": 0})        # not on disk
    meta["test"]["screw"].append({"img_path": "../outside.png", "mask_path": "", "cls_name": "screw",
                                  "specie_name": "good", "anomaly": 0})         # leads out of the root
    drawing.save(mvtec.parent / "outside.png", np.zeros((48, 48, 3), np.uint8))
    rc, out, err = convert_index(capsys, tmp_path / "out", "--from-meta", write_json(mvtec / "meta.json", meta))
    assert rc == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    reasons = {p["reason"].split(":")[0]: p for p in summary["problems"]}
    assert set(reasons) == {"mask size differs", "duplicate path", "missing image", "outside the root"}
    assert reasons["mask size differs"]["path"] == str(mvtec / anomalous[0]["mask_path"])
    assert reasons["missing image"]["path"] == str(mvtec / "screw/train/good/999.png")
    assert "test/bottle[" in reasons["duplicate path"]["reason"]
    keys = {r.key for r in read_manifest(tmp_path / "out")}
    assert anomalous[0]["img_path"].rsplit(".", 1)[0] not in keys
    assert normal["img_path"].rsplit(".", 1)[0] in keys                        # the first listing is kept
    assert "skipped" in out and summary["skipped"] == 4


# ------------------------------------------------------------------------------------------
# Class names
# ------------------------------------------------------------------------------------------

def test_adaclip_tn3k_class_name_maps_and_keeps_the_catalog_identity(tmp_path, capsys):
    root = tmp_path / "TN3K"
    make_raw("tn3k", root)
    images = sorted((root / "test-image").iterdir())
    meta = {"train": {}, "test": {"tn3k": [
        {"img_path": p.relative_to(root).as_posix(), "mask_path": f"test-mask/{p.name}", "cls_name": "tn3k",
         "specie_name": "defect", "anomaly": 1} for p in images]}}
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-meta", write_json(root / "meta.json", meta),
                               dataset="tn3k", classes=None)
    assert rc == 0, err
    got = read_manifest(tmp_path / "out")
    assert len(got) == len(images)
    assert {(r.cls, r.dataset, r.domain, r.mask_threshold) for r in got} == {("thyroid", "tn3k", "medical", 127)}


def test_anomalyclip_sdd_class_name_maps(tmp_path, capsys):
    root = tmp_path / "SDD"
    rng = np.random.default_rng(0)
    rows = []
    for k, specie in enumerate(("good", "good", "bad")):
        img, mask = drawing.sample(48, 48, rng, specie == "bad")
        rel = f"electrical commutators/test/{specie}/{k}.png"
        drawing.save(root / rel, img)
        mask_rel = ""
        if specie == "bad":
            mask_rel = f"electrical commutators/ground_truth/bad/{k}.png"
            drawing.save_mask(root / mask_rel, mask)
        rows.append({"img_path": rel, "mask_path": mask_rel, "cls_name": "electrical commutators",
                     "specie_name": specie, "anomaly": int(specie == "bad")})
    meta = write_json(root / "meta.json", {"train": {}, "test": {"electrical commutators": rows}})
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from", meta, dataset="sdd", classes=None)
    assert rc == 0, err
    got = read_manifest(tmp_path / "out")
    assert {r.cls for r in got} == {"SDD"} and sum(r.label for r in got) == 1
    assert all(" " not in r.key for r in got)


def test_a_class_the_catalog_does_not_know_is_one_line(mvtec, tmp_path, capsys):
    meta = anomalyclip_meta(mvtec)
    for r in meta["test"]["bottle"]:
        r["cls_name"] = "bottles"
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-meta", write_json(mvtec / "meta.json", meta))
    line = one_error_line(err)
    assert rc == 2 and "'bottles'" in line and "mvtec-ad" in line


def test_index_without_a_catalog_class_offers_classes(mvtec, tmp_path, capsys):
    meta = write_json(mvtec / "meta.json", anomalyclip_meta(mvtec))
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-meta", meta, classes=None)
    line = one_error_line(err)
    assert rc == 2 and "cable" in line and "--classes bottle,screw" in line
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-meta", meta, classes=("bottle", "bolt"))
    assert rc == 2 and "unknown class 'bolt'" in one_error_line(err)


# ------------------------------------------------------------------------------------------
# Safety rules of zsadx data convert
# ------------------------------------------------------------------------------------------

def test_out_inside_the_index_root_is_refused(mvtec, tmp_path, capsys):
    meta = write_json(mvtec / "meta.json", anomalyclip_meta(mvtec))
    rc, _, err = convert_index(capsys, mvtec / "converted", "--from-meta", meta)
    assert rc == 2 and "inside --root" in one_error_line(err)
    assert not (mvtec / "converted").exists()


def test_out_folder_zsadx_did_not_write_is_refused(mvtec, tmp_path, capsys):
    meta = write_json(mvtec / "meta.json", anomalyclip_meta(mvtec))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    rc, _, err = convert_index(capsys, tmp_path / "mine", "--from-meta", meta)
    assert rc == 2 and "not written by" in one_error_line(err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_folder_dataset_refuses_an_index(mvtec, tmp_path, capsys):
    meta = write_json(mvtec / "meta.json", anomalyclip_meta(mvtec))
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-meta", meta, dataset="folder", classes=None)
    assert rc == 2 and "catalog dataset" in one_error_line(err)


# ------------------------------------------------------------------------------------------
# export-meta and the round trip
# ------------------------------------------------------------------------------------------

def test_round_trip_manifest_meta_manifest_is_the_identity(mvtec, tmp_path, capsys):
    raw = convert_raw(capsys, mvtec, tmp_path / "raw-out")
    exported = tmp_path / "meta.json"
    rc, out, err = run(capsys, "data", "export-meta", tmp_path / "raw-out", "--out", exported)
    assert rc == 0, err
    assert f"relative to {mvtec}" in out                  # the conversion's raw root, from summary.json
    # the rows the official writer makes for that download (its order is os.listdir's)
    assert _rows(json.loads(exported.read_text())) == _rows(anomalyclip_meta(mvtec))
    rc, _, err = convert_index(capsys, tmp_path / "back", "--from-meta", exported, "--root", mvtec)
    assert rc == 0, err
    assert read_manifest(tmp_path / "back") == raw


def _rows(meta: dict) -> list[tuple[str, str]]:
    return sorted((split, json.dumps(r, sort_keys=True)) for split, part in meta.items() for c in part.values()
                  for r in c)


def test_exported_meta_read_as_the_official_loader_does_gives_the_records(mvtec, tmp_path, capsys):
    raw = convert_raw(capsys, mvtec, tmp_path / "raw-out")
    run(capsys, "data", "export-meta", tmp_path / "raw-out", "--out", mvtec / "meta.json")
    meta = json.loads((mvtec / "meta.json").read_text())
    by_image = {r.image: r for r in raw}
    seen = 0
    for mode in ("train", "test"):
        for cls in meta[mode]:  # AnomalyCLIP dataset.py: root joined to img_path / mask_path
            for row in meta[mode][cls]:
                rec = by_image[os.path.join(str(mvtec), row["img_path"])]
                assert (rec.split, rec.cls, rec.label) == (mode, row["cls_name"], row["anomaly"])
                if row["anomaly"]:
                    official = np.array(Image.open(os.path.join(str(mvtec), row["mask_path"])).convert("L")) > 0
                    ours = np.array(Image.open(rec.mask).convert("L")) > rec.mask_threshold
                    assert (official == ours).all()
                seen += 1
    assert seen == len(raw)


def test_export_meta_uses_the_repo_class_names_and_keeps_crop_keys(tmp_path, capsys):
    root = tmp_path / "TN3K"
    make_raw("tn3k", root)
    run(capsys, "data", "convert", "tn3k", "--root", root, "--out", tmp_path / "c", "--workers", "1")
    rc, _, err = run(capsys, "data", "export-meta", tmp_path / "c", "--out", tmp_path / "meta.json",
                     "--names", "adaclip")
    assert rc == 0, err
    assert list(json.loads((tmp_path / "meta.json").read_text())["test"]) == ["tn3k"]


def test_export_meta_of_crops_carries_the_keys(tmp_path, capsys):
    raw_root = tmp_path / "data" / "sdd"
    make_raw("sdd", raw_root)
    rc, _, err = run(capsys, "data", "convert", "sdd", "--root", raw_root, "--out", tmp_path / "data" / "c",
                     "--workers", "1")
    assert rc == 0, err
    recs = read_manifest(tmp_path / "data" / "c")
    rc, _, err = run(capsys, "data", "export-meta", tmp_path / "data" / "c", "--out", tmp_path / "meta.json",
                     "--root", tmp_path / "data")
    assert rc == 0, err
    rows = [r for part in json.loads((tmp_path / "meta.json").read_text()).values() for c in part.values() for r in c]
    assert rows and all(r["img_path"].startswith("c/derived/") and r["zsadx_key"] for r in rows)
    rc, _, err = convert_index(capsys, tmp_path / "back", "--from-meta", tmp_path / "meta.json", "--root",
                               tmp_path / "data", dataset="sdd", classes=None)
    assert rc == 0, err
    back = read_manifest(tmp_path / "back")
    # the pieces come back under their own keys; only `source` names the derived file now
    assert [dataclasses.replace(r, source="") for r in back] == [dataclasses.replace(r, source="") for r in recs]


def test_export_meta_never_replaces_a_file_and_checks_root(mvtec, tmp_path, capsys):
    convert_raw(capsys, mvtec, tmp_path / "raw-out")
    theirs = write_json(tmp_path / "meta.json", {"train": {}, "test": {}})
    rc, _, err = run(capsys, "data", "export-meta", tmp_path / "raw-out", "--out", theirs)
    assert rc == 2 and "exists" in one_error_line(err)
    assert json.loads(theirs.read_text()) == {"train": {}, "test": {}}
    rc, _, err = run(capsys, "data", "export-meta", tmp_path / "raw-out", "--out", tmp_path / "new.json",
                     "--root", mvtec / "bottle")
    assert rc == 2 and "outside --root" in one_error_line(err)
    assert not (tmp_path / "new.json").exists()


def test_convert_without_root_or_index_is_one_line(tmp_path, capsys):
    rc, _, err = run(capsys, "data", "convert", "mvtec-ad", "--out", tmp_path / "out")
    line = one_error_line(err)
    assert rc == 2 and "--root" in line and "--from" in line


def test_from_options_exclude_each_other(mvtec, tmp_path, capsys):
    meta = write_json(mvtec / "meta.json", anomalyclip_meta(mvtec))
    with pytest.raises(SystemExit) as exc:
        main(["data", "convert", "mvtec-ad", "--from", str(meta), "--from-meta", str(meta), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_a_folder_or_empty_mask_path_is_an_image_level_record_and_a_missing_mask_is_reported(mvtec, tmp_path,
                                                                                             capsys):
    meta = anomalyclip_meta(mvtec)
    bad = [r for r in meta["test"]["bottle"] if r["anomaly"]]
    bad[0]["mask_path"] = "bottle/ground_truth"           # a folder: "no mask" to AnomalyCLIP's loader
    bad[1]["mask_path"] = "bottle/ground_truth/gone.png"  # not on disk
    rc, _, err = convert_index(capsys, tmp_path / "out", "--from-meta", write_json(mvtec / "meta.json", meta))
    assert rc == 0, err
    recs = {r.key: r for r in read_manifest(tmp_path / "out")}
    first = recs[bad[0]["img_path"].rsplit(".", 1)[0]]
    assert first.label == 1 and first.mask is None
    assert bad[1]["img_path"].rsplit(".", 1)[0] not in recs
    problems = json.loads((tmp_path / "out" / "summary.json").read_text())["problems"]
    assert [p["reason"].split(":")[0] for p in problems] == ["missing mask"]
