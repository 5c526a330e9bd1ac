"""Issue 20 item 3, the papers' qualitative figure: `zsadx figure GRID --dataset D --out fig.png|pdf`
on a real grid (tiny backbone, synthetic VisA, debug executor): WinCLIP zero-shot, FADE one-shot and
tiny AnomalyCLIP from a given checkpoint; rows = images, columns = image, ground truth, each
method's heat map at one colour scale per row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import make_shards, one_error_line, run_cli
from test_grid_checkpoints import write_checkpoint
from zsadx.cli import main
from zsadx.eval import figure
from zsadx.eval.visualize import overlay

METHODS = ["winclip", "fade-1shot", "anomalyclip"]


def grid_spec(root: Path, shards: Path, methods: list[dict]) -> dict:
    return {"name": "fig", "out_dir": str(root / "out"), "shards": str(shards), "cluster": "debug",
            "checkpoints_root": str(root / "weights"), "methods": methods,
            "protocol": {"type": "explicit"}, "train_sets": [{"name": "lab"}], "test_sets": ["visa"],
            "eval_overrides": ["data.num_workers=0", "data.batch_size=16"]}


SPEC_METHODS = [{"config": "methods/winclip-tiny", "label": "winclip"},
                {"config": "methods/fade-tiny", "label": "fade-1shot", "shots": [1]},
                {"config": "methods/anomalyclip-tiny", "label": "anomalyclip", "checkpoints": {"lab": "ac.pt"}}]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """The grid config, its three evaluation cells done."""
    root = tmp_path_factory.mktemp("figure")
    shards = make_shards(root / "data", {"visa": 1}, size=64)
    write_checkpoint(root / "weights" / "ac.pt", seed=5)
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid_spec(root, shards, SPEC_METHODS)))
    assert main(["grid", "run", str(path)]) == 0
    return path


def out_dir(grid: Path) -> Path:
    return grid.parent / "out"


def results(grid: Path) -> dict[str, dict]:
    """Method label -> its results file."""
    found = {}
    for marker in out_dir(grid).rglob("cell.json"):
        m = json.loads(marker.read_text())
        found[m["id"].split("/")[1]] = json.loads(Path(m["result"]).read_text())
    return found


def test_figure_rows_columns_and_one_colour_scale_per_row(grid, tmp_path, capsys, monkeypatch):
    drawn_data = []
    render = figure.render

    def spy(data, panel):  # what the command draws, to check the PNG against
        drawn_data.append(data)
        return render(data, panel)

    monkeypatch.setattr(figure, "render", spy)
    rc, out, _ = run_cli(capsys, "figure", grid, "--dataset", "visa", "--images", "3", "--out", tmp_path / "fig.png")
    assert rc == 0 and f"figure: {tmp_path / 'fig.png'}" in out
    assert figure.figure_datasets(out_dir(grid)) == ["visa"]
    (data,) = drawn_data
    assert [c.label for c in data.columns] == METHODS                           # the grid's order
    # Rows: three anomalous test images with masks, of three different classes (spread over them).
    res = results(grid)
    truth = {s["key"]: s for s in res["winclip"]["scores"]}
    assert len(data.rows) == 3 and len({r.cls for r in data.rows}) == 3
    assert all(truth[r.key]["label"] == 1 and r.mask.any() for r in data.rows)
    # The maps are the cells' own: re-running each cell gives the image scores its results file holds.
    for j, label in enumerate(METHODS):
        scores = {s["key"]: s["score"] for s in res[label]["scores"]}
        for row in data.rows:
            assert row.scores[j] == pytest.approx(scores[row.key], rel=1e-5, abs=1e-6), (label, row.key)
    # Every heat map panel of a row is drawn at that row's scale: min..max over all methods' maps.
    png = np.asarray(Image.open(tmp_path / "fig.png").convert("RGB"))
    _, boxes = render(data, 160)
    per_map_scaled = []
    for i, row in enumerate(data.rows):
        lo, hi = row.scale
        assert lo == min(m.min() for m in row.maps) and hi == max(m.max() for m in row.maps)
        for j, amap in enumerate(row.maps):
            x, y = boxes[(i, 2 + j)]
            drawn = png[y:y + 160, x:x + 160].astype(int)
            assert np.abs(drawn - overlay(row.image, amap, vmin=lo, vmax=hi)).max() <= 1
            per_map_scaled.append(np.abs(drawn - overlay(row.image, amap)).max())
        x, y = boxes[(i, 1)]
        assert np.array_equal(png[y:y + 160, x:x + 160, 0] > 127, row.mask)    # ground truth column
    assert max(per_map_scaled) > 10   # a scale of its own per map would draw other colours


def test_seeded_draw_classes_and_keys(grid):
    pool = figure.dataset_images(str(yaml.safe_load(grid.read_text())["shards"]), "visa", "test")
    draw = figure.pick_images(pool, 4, seed=0, dataset="visa")
    assert draw == figure.pick_images(pool, 4, seed=0, dataset="visa")            # seeded: the same again
    assert draw != figure.pick_images(pool, 4, seed=1, dataset="visa")
    assert len({pool[k].cls for k in draw}) == 4 and all(pool[k].label == 1 and pool[k].has_mask for k in draw)
    some = {k: v for k, v in pool.items() if v.cls in ("candle", "pcb1")}
    assert {some[k].cls for k in figure.pick_images(some, 2, 0, "visa")} == {"candle", "pcb1"}
    # --classes and --keys through the CLI, on a PDF
    keys = sorted(k for k, v in pool.items() if v.cls == "pcb1")[:2]    # a normal image may be asked for too
    data = figure.figure_data(out_dir(grid), "visa", keys=[keys[1], keys[0]], methods=["winclip"])
    assert [r.key for r in data.rows] == [keys[1], keys[0]]
    out = grid.parent / "fig.pdf"
    assert main(["figure", str(grid), "--dataset", "visa", "--classes", "pcb1", "--images", "1",
                 "--methods", "winclip", "--out", str(out)]) == 0
    assert out.read_bytes()[:5] == b"%PDF-"


def one_line_error(capsys, *argv) -> str:
    rc, _, err = run_cli(capsys, "figure", *argv)
    assert rc == 2
    return one_error_line(err)


def test_bad_requests_are_one_line_and_write_nothing(grid, tmp_path, capsys):
    out = tmp_path / "fig.png"
    base = [grid, "--out", out]
    line = one_line_error(capsys, *base, "--dataset", "vissa")
    assert "no evaluation cell of dataset 'vissa'" in line and "did you mean 'visa'" in line
    line = one_line_error(capsys, *base, "--dataset", "visa", "--keys", "candle/Data/Images/Anomaly/9999")
    assert "'candle/Data/Images/Anomaly/9999' is not a test image of dataset 'visa'" in line
    line = one_line_error(capsys, *base, "--dataset", "visa", "--methods", "winclp")
    assert "method 'winclp' has no cell" in line and "did you mean 'winclip'" in line
    line = one_line_error(capsys, *base, "--dataset", "visa", "--classes", "candel")
    assert "candel" in line
    line = one_line_error(capsys, grid, "--dataset", "visa", "--out", tmp_path / "fig.jpg")
    assert "write a .png or a .pdf" in line
    line = one_line_error(capsys, *base, "--dataset", "visa", "--device", "gpu0")
    assert "unknown device 'gpu0'" in line
    if not torch.cuda.is_available():
        assert "no GPU is visible" in one_line_error(capsys, *base, "--dataset", "visa", "--device", "cuda")
    assert not list(tmp_path.iterdir())


def copy_grid(grid: Path, root: Path) -> None:
    """The grid's outputs and weights under ``root``, the markers and configs pointing at the copies."""
    shutil.copytree(out_dir(grid), root / "out")
    shutil.copytree(grid.parent / "weights", root / "weights")
    for path in [*(root / "out").rglob("cell.json"), *(root / "out").rglob("*.config.yaml")]:
        path.write_text(path.read_text().replace(str(grid.parent), str(root)))


def test_a_method_cell_not_done_or_changed_since_is_one_line(grid, tmp_path, capsys):
    root = tmp_path / "copy"
    copy_grid(grid, root)
    spec = grid_spec(root, Path(yaml.safe_load(grid.read_text())["shards"]), SPEC_METHODS)
    # A failed cell (its marker says so), from the grid folder and from the grid config.
    marker = next((root / "out").rglob("eval/fade-1shot/*/visa/*/cell.json"))
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "status": "failed"}))
    line = one_line_error(capsys, root / "out", "--dataset", "visa", "--out", root / "f.png")
    assert "cell eval/fade-1shot/zero-shot/visa/seed0-1shot is failed, not done" in line and "--methods" in line
    (root / "grid.yaml").write_text(yaml.safe_dump(spec))
    line = one_line_error(capsys, root / "grid.yaml", "--dataset", "visa", "--out", root / "f.png")
    assert "eval/fade-1shot/zero-shot/visa/seed0-1shot is failed, not done" in line
    # A method of the grid config never run (no marker at all).
    spec["methods"] = [*SPEC_METHODS, {"config": "methods/clip-tiny", "label": "clip"}]
    (root / "grid.yaml").write_text(yaml.safe_dump(spec))
    line = one_line_error(capsys, root / "grid.yaml", "--dataset", "visa", "--methods", "winclip,clip",
                          "--out", root / "f.png")
    assert "cell eval/clip/zero-shot/visa/seed0 is missing, not done" in line
    # The given checkpoint replaced after the cell was evaluated: its maps would not be its numbers'.
    write_checkpoint(root / "weights" / "ac.pt", seed=6)
    line = one_line_error(capsys, root / "out", "--dataset", "visa", "--methods", "anomalyclip", "--out", root / "f.png")
    assert "cell eval/anomalyclip/lab/visa/seed0" in line and "changed since it was evaluated" in line
    assert not (root / "f.png").exists()


def test_a_method_with_several_shot_counts_gets_a_column_each_from_its_lowest_seed(grid, tmp_path):
    root = tmp_path / "copy"
    copy_grid(grid, root)
    (marker,) = (root / "out").rglob("eval/winclip/*/visa/seed0/cell.json")
    for cell_id in ("eval/winclip/zero-shot/visa/seed1", "eval/winclip/zero-shot/visa/seed0-2shot"):
        folder = root / "out" / cell_id
        folder.mkdir(parents=True)
        (folder / "cell.json").write_text(json.dumps({**json.loads(marker.read_text()), "id": cell_id}))
    columns = figure.figure_columns(root / "out", "visa", ["winclip", "anomalyclip"])
    assert [(c.label, c.cell.id) for c in columns] == [
        ("winclip (zero-shot)", "eval/winclip/zero-shot/visa/seed0"),
        ("winclip (zero-shot, 2-shot)", "eval/winclip/zero-shot/visa/seed0-2shot"),
        ("anomalyclip", "eval/anomalyclip/lab/visa/seed0")]
