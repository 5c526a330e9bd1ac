"""A dataset evaluated on part of its classes (``--classes``, or shards of a partial download) is
recorded so in the results file, and ``zsadx table`` shows it as such and never averages it as the
full set -- from plain results folders and from grid cell markers alike."""
from __future__ import annotations

import json
import shutil

import pytest

from zsadx.cli import main
from zsadx.data.convert import convert
from zsadx.data.shards import write_shards
from zsadx.data.synthetic import make_raw


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """SDD (1 class) in full and BTAD (3 classes): the shards of everything, and those of a partial
    BTAD download (classes 01 and 02 only, converted with --classes), whose index says what it lacks."""
    base = tmp_path_factory.mktemp("subsets")
    text = ""
    for name in ("sdd", "btad"):
        make_raw(name, base / "raw" / name, seed=4, n=1)
        convert(name, base / "raw" / name, base / "m" / name, progress=False)
        text += (base / "m" / name / "manifest.jsonl").read_text()
    (base / "all.jsonl").write_text(text)
    write_shards(base / "all.jsonl", base / "full", size=64, progress=False)
    shutil.copytree(base / "raw" / "btad", base / "raw" / "btad-partial", ignore=shutil.ignore_patterns("03"))
    assert main(["data", "convert", "btad", "--root", str(base / "raw" / "btad-partial"), "--out",
                 str(base / "m" / "btad-partial"), "--classes", "01,02"]) == 0
    assert main(["data", "shard", str(base / "m" / "btad-partial" / "manifest.jsonl"), "--out",
                 str(base / "partial"), "--size", "64"]) == 0
    index = json.loads((base / "partial" / "index.json").read_text())
    assert index["datasets"]["btad"]["missing_classes"] == ["03"]
    return base


def zsadx_eval(shards, dataset, out, *classes):
    assert main(["eval", "--method", "methods/clip-tiny", "--shards", str(shards), "--dataset", dataset,
                 *(["--classes", *classes] if classes else []), "--out", str(out),
                 "method.backbone.image_size=64", "data.num_workers=0"]) == 0
    (path,) = [p for p in out.glob(f"*-{dataset}.json")]
    return json.loads(path.read_text())


def table(capsys, root) -> dict:
    capsys.readouterr()
    assert main(["table", str(root), "--format", "json", "--metrics", "image_auroc,pixel_auroc"]) == 0
    return json.loads(capsys.readouterr().out)


def rows(t: dict) -> dict:
    return {r["dataset"]: r["clip"] for r in t["rows"]}


def test_classes_option_makes_a_subset_row_left_out_of_the_average(shards, tmp_path, capsys):
    sdd = zsadx_eval(shards / "full", "sdd", tmp_path / "sdd")
    btad = zsadx_eval(shards / "full", "btad", tmp_path / "btad", "01", "02")
    assert sdd["subset"] is False and sdd["classes_missing"] == []
    assert btad["subset"] is True and btad["classes_missing"] == ["03"]
    assert btad["catalog_classes"] == ["01", "02", "03"]
    t = rows(table(capsys, tmp_path))
    assert list(t) == ["sdd", "industrial average", "btad (2/3 classes)"]
    # The average is that of the full datasets alone (SDD), not of SDD and two thirds of BTAD.
    assert t["industrial average"][0][0] == pytest.approx(sdd["mean"]["image_auroc"], rel=1e-12)
    assert t["btad (2/3 classes)"][0][0] == pytest.approx(btad["mean"]["image_auroc"], rel=1e-12)
    capsys.readouterr()
    assert main(["table", str(tmp_path)]) == 0
    md = capsys.readouterr().out
    assert "| industrial | btad (2/3 classes) |" in md and "left out of the domain average" in md


def test_partial_download_in_the_index_is_a_subset_without_classes_option(shards, tmp_path, capsys):
    btad = zsadx_eval(shards / "partial", "btad", tmp_path / "a")
    assert btad["classes"] == ["01", "02"] and btad["subset"] is True and btad["classes_missing"] == ["03"]
    full = zsadx_eval(shards / "full", "btad", tmp_path / "b")
    assert full["subset"] is False
    t = table(capsys, tmp_path)
    assert t["subset_rows"] == ["btad (2/3 classes)"]
    r = rows(t)
    assert list(r) == ["btad", "industrial average", "btad (2/3 classes)"]   # the full set is its own row
    assert r["industrial average"][0][0] == pytest.approx(full["mean"]["image_auroc"], rel=1e-12)


def test_grid_cell_markers_carry_the_subset_too(shards, tmp_path, capsys):
    from launch import cache

    grid = tmp_path / "grid"
    for dataset, classes in (("sdd", ()), ("btad", ("01",))):
        folder = grid / "eval" / "clip" / "zero-shot" / dataset / "seed0"
        zsadx_eval(shards / "full", dataset, folder, *classes)
        (result,) = folder.glob(f"*-{dataset}.json")
        cache.write_marker(folder, id=f"eval/clip/zero-shot/{dataset}/seed0", status="done", result=str(result))
    r = rows(table(capsys, grid))
    assert list(r) == ["sdd", "industrial average", "btad (1/3 classes)"]
    assert r["industrial average"][0][0] == pytest.approx(r["sdd"][0][0], rel=1e-12)


def test_a_cut_off_cell_marker_is_left_out_with_a_warning_naming_it(shards, tmp_path, capsys, caplog):
    from launch import cache

    grid = tmp_path / "grid"
    for dataset in ("sdd", "btad"):
        folder = grid / "eval" / "clip" / "zero-shot" / dataset / "seed0"
        zsadx_eval(shards / "full", dataset, folder)
        (result,) = folder.glob(f"*-{dataset}.json")
        cache.write_marker(folder, id=f"eval/clip/zero-shot/{dataset}/seed0", status="done", result=str(result))
    marker = grid / "eval" / "clip" / "zero-shot" / "btad" / "seed0" / "cell.json"
    marker.write_text(marker.read_text()[:25])  # a job killed while its marker was written by an old zsadx
    with caplog.at_level("WARNING"):
        r = rows(table(capsys, grid))
    assert list(r) == ["sdd", "industrial average"]
    assert any(str(marker) in m and "unreadable" in m for m in caplog.messages)


def test_a_domain_of_subsets_only_has_no_average_row(shards, tmp_path, capsys):
    zsadx_eval(shards / "full", "btad", tmp_path / "one", "01")
    zsadx_eval(shards / "full", "btad", tmp_path / "two", "02")
    # Two different single classes: two rows that say which class, and no average.
    assert list(rows(table(capsys, tmp_path))) == ["btad (1/3 classes: 01)", "btad (1/3 classes: 02)"]
