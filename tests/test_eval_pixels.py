"""Anomalous images without a mask have no pixel ground truth: they count for the image metrics and
are left out of every pixel metric (not counted as normal pixels), and the results file says so."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from zsadx.cli import main
from zsadx.data.convert import convert
from zsadx.data.shards import write_shards
from zsadx.data.synthetic import make_raw
from zsadx.eval.metrics import ClassMetrics

PIXEL = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def test_mask_less_anomalous_pixels_are_left_out_as_sklearn_on_the_kept_pixels():
    rng = np.random.default_rng(5)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 3:8, 4:10] = True                  # image 0: anomalous, with its mask
    maps[1] += 0.5                              # image 1: anomalous, no mask (its blank mask is not the truth)
    labels, has_mask = np.array([1, 1, 0]), np.array([True, False, False])   # image 2: normal
    scores = maps.reshape(3, -1).max(1)
    acc = ClassMetrics("widget")
    acc.add(scores, labels, maps, masks, has_mask=has_mask)
    got = acc.compute()
    kept = [0, 2]
    y, s = masks[kept].ravel(), maps[kept].ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), rel=1e-12)
    # Counting image 1's pixels as normal (the old rule) gives another number.
    assert abs(roc_auc_score(masks.ravel(), maps.ravel()) - got["pixel_auroc"]) > 0.01
    only_kept = ClassMetrics("widget")
    only_kept.add(scores[kept], labels[kept], maps[kept], masks[kept])
    assert got["pixel_aupro"] == pytest.approx(only_kept.compute()["pixel_aupro"], rel=1e-12)
    # Image metrics keep every image; the count survives gathering from another rank.
    assert acc.image_metrics().auroc == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert acc.pixel_excluded == 1
    merged = ClassMetrics("widget")
    merged.merge(acc.state())
    merged.merge(acc.state())
    assert merged.pixel_excluded == 2


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory):
    """The ``folder`` dataset twice: as planted (one anomalous image has no mask), and without that image."""
    base = tmp_path_factory.mktemp("pixels")
    planted = make_raw("folder", base / "all" / "widget", seed=1, n=1)
    (maskless,) = [p for p in planted if p.label and not p.has_mask]
    shutil.copytree(base / "all" / "widget", base / "kept" / "widget")
    (base / "kept" / "widget" / maskless.source).unlink()
    out = {}
    for name in ("all", "kept"):
        convert("folder", base / name / "widget", base / "m" / name, progress=False)
        write_shards(base / "m" / name / "manifest.jsonl", base / "s" / name, size=64, progress=False)
        out[name] = base / "s" / name
    return out


def test_zsadx_eval_leaves_mask_less_anomalies_out_of_pixel_metrics(folder_shards, tmp_path):
    results = {}
    for name, shards in folder_shards.items():
        # One image per batch: each image's map is computed alike in both runs.
        assert main(["eval", "--method", "methods/clip-tiny", "--shards", str(shards), "--dataset", "folder",
                     "--out", str(tmp_path / name), "method.backbone.image_size=64", "data.batch_size=1",
                     "data.num_workers=0"]) == 0
        (path,) = (tmp_path / name).glob("*.json")
        results[name] = json.loads(path.read_text())
    everything, kept = results["all"], results["kept"]
    assert everything["images"] == kept["images"] + 1
    for k in PIXEL:  # the mask-less image adds nothing to any pixel metric
        assert everything["mean"][k] == pytest.approx(kept["mean"][k], rel=1e-9), k
    assert everything["pixel_excluded"] == 1 and everything["pixel_excluded_per_class"] == {"widget": 1}
    assert kept["pixel_excluded"] == 0
    # ... and still counts for the image metrics.
    (extra,) = [s for s in everything["scores"] if s["key"] not in {t["key"] for t in kept["scores"]}]
    assert extra["label"] == 1
