"""Issue 20 item 3, per-class tables: `zsadx table --per-class` prints each dataset's classes and its
mean row, columns = methods x metrics, in md/csv/tex/json; the values are the results files' own."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from conftest import make_shards, run_cli
from zsadx.cli import main

METRICS = ["image_auroc", "pixel_auroc"]


def zsadx_eval(shards: Path, out: Path, method: str, dataset: str, *over: str, classes=()) -> dict:
    before = set(out.glob("*.json"))
    assert main(["eval", "--method", method, "--shards", str(shards), "--dataset", dataset, "--out", str(out),
                 "data.num_workers=0", *over, *(["--classes", *classes] if classes else [])]) == 0
    (path,) = set(out.glob("*.json")) - before
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """Results files: CLIP on BTAD at two seeds (two image sizes, so the seeds differ), on SDD and on
    two of BTAD's three classes; WinCLIP on BTAD only."""
    base = tmp_path_factory.mktemp("per-class")
    shards = make_shards(base / "data", {"btad": 1, "sdd": 1}, size=64, seed=3)
    out = base / "results"
    res = {"clip0": zsadx_eval(shards, out, "methods/clip-tiny", "btad", "method.backbone.image_size=64"),
           "clip1": zsadx_eval(shards, out, "methods/clip-tiny", "btad", "method.backbone.image_size=96", "seed=1"),
           "clip-sdd": zsadx_eval(shards, out, "methods/clip-tiny", "sdd", "method.backbone.image_size=64"),
           "clip-sub": zsadx_eval(shards, out, "methods/clip-tiny", "btad", "method.backbone.image_size=64",
                                  classes=("01", "02")),
           "winclip": zsadx_eval(shards, out, "methods/winclip-tiny", "btad")}
    return out, res


def table(capsys, out: Path, fmt: str, *more: str) -> str:
    rc, text, err = run_cli(capsys, "table", out, "--per-class", "--metrics", ",".join(METRICS), "--format", fmt, *more)
    assert rc == 0, err
    return text


def test_rows_are_classes_then_the_mean_and_values_are_the_results_files(runs, capsys):
    out, res = runs
    t = json.loads(table(capsys, out, "json"))
    assert t["columns"] == ["clip", "winclip"] and t["metrics"] == METRICS
    order = [(r["dataset"], r["class"]) for r in t["rows"]]
    assert order == [("btad", "01"), ("btad", "02"), ("btad", "03"), ("btad", "mean"),
                     ("sdd", "SDD"), ("sdd", "mean"),
                     ("btad (2/3 classes)", "01"), ("btad (2/3 classes)", "02"), ("btad (2/3 classes)", "mean")]
    rows = {(r["dataset"], r["class"]): r for r in t["rows"]}
    assert [r["mean_row"] for r in t["rows"]].count(True) == 3
    for i, m in enumerate(METRICS):
        for c in ("01", "02", "03"):
            # CLIP: mean and std over its two seeds' per-class values; WinCLIP: its one value
            seeds = [res["clip0"]["per_class"][c][m], res["clip1"]["per_class"][c][m]]
            mean, std = rows[("btad", c)]["clip"][i]
            assert mean == pytest.approx(statistics.fmean(seeds), rel=1e-12)
            assert std == pytest.approx(statistics.stdev(seeds), rel=1e-9, abs=1e-15)
            assert rows[("btad", c)]["winclip"][i] == [pytest.approx(res["winclip"]["per_class"][c][m], rel=1e-12), None]
        # the mean row is the results files' mean over classes ...
        assert rows[("btad", "mean")]["clip"][i][0] == pytest.approx(
            statistics.fmean([res["clip0"]["mean"][m], res["clip1"]["mean"][m]]), rel=1e-12)
        assert rows[("btad", "mean")]["winclip"][i][0] == pytest.approx(res["winclip"]["mean"][m], rel=1e-12)
        assert rows[("sdd", "mean")]["clip"][i][0] == pytest.approx(res["clip-sdd"]["mean"][m], rel=1e-12)
        assert rows[("btad (2/3 classes)", "02")]["clip"][i][0] == pytest.approx(
            res["clip-sub"]["per_class"]["02"][m], rel=1e-12)
    assert rows[("sdd", "SDD")]["winclip"] == [None, None]                     # not evaluated there
    # ... and equal to the dataset's row of the plain table
    rc, text, _ = run_cli(capsys, "table", out, "--metrics", ",".join(METRICS), "--format", "json")
    plain = {r["dataset"]: r for r in json.loads(text)["rows"]}
    for ds in ("btad", "sdd", "btad (2/3 classes)"):
        for col in ("clip", "winclip"):
            for a, b in zip(plain[ds][col], rows[(ds, "mean")][col]):
                assert (a is None and b is None) or a[0] == pytest.approx(b[0], rel=1e-12)


def test_printed_formats(runs, capsys):
    out, res = runs
    v = lambda key, c, m: f"{100 * res[key]['per_class'][c][m]:.1f}"  # noqa: E731
    md = table(capsys, out, "md").splitlines()
    assert md[0] == "| dataset | class | clip image_auroc | clip pixel_auroc | winclip image_auroc | winclip pixel_auroc |"
    sdd = next(line for line in md if line.startswith("| sdd |"))
    assert sdd == f"| sdd | SDD | {v('clip-sdd', 'SDD', 'image_auroc')} | {v('clip-sdd', 'SDD', 'pixel_auroc')} | - | - |"
    assert md[md.index(sdd) + 1].startswith("|  | mean | ")                      # the dataset named once
    assert "±" in md[2] and "mean over the dataset's classes" in md[-2]        # two seeds: mean±std
    rows = list(csv.reader(io.StringIO(table(capsys, out, "csv"))))
    assert rows[0][2:] == ["clip image_auroc", "clip pixel_auroc", "winclip image_auroc", "winclip pixel_auroc"]
    assert [r[:2] for r in rows[1:5]] == [["btad", "01"], ["btad", "02"], ["btad", "03"], ["btad", "mean"]]
    assert rows[1][4] == v("winclip", "01", "image_auroc")                          # csv: never bold
    tex = table(capsys, out, "tex")
    assert "\\multicolumn{2}{c}{clip} & \\multicolumn{2}{c}{winclip}" in tex
    assert "\\cmidrule(lr){3-4}\\cmidrule(lr){5-6}" in tex and "image\\_auroc & pixel\\_auroc" in tex
    assert tex.count("& mean &") == 3 and "\\bottomrule\n\\end{tabular}" in tex
    # the columns axis and the output file work as for the plain table
    target = out.parent / "per-class.md"
    assert main(["table", str(out), "--per-class", "--columns", "seed", "--metrics", "image_auroc",
                 "--out", str(target)]) == 0
    assert target.read_text().splitlines()[0] == "| dataset | class | 0 image_auroc | 1 image_auroc |"
