"""The evaluator: end to end on shards, results files, undefined metrics, 1 vs 2 processes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from zsadx.cli import main
from zsadx.config import ConfigError, load_config, load_yaml
from zsadx.data.convert import convert
from zsadx.data.shards import write_shards
from zsadx.data.synthetic import make_raw
from zsadx.eval.evaluator import EvalConfig, evaluate, results_name

ROOT = Path(__file__).resolve().parent.parent
METRICS = {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalshards")
    text = ""
    for name in ("mpdd", "kvasir", "headct"):
        make_raw(name, base / "raw" / name, seed=2, n=2)
        convert(name, base / "raw" / name, base / "m" / name, progress=False)
        text += (base / "m" / name / "manifest.jsonl").read_text()
    (base / "all.jsonl").write_text(text)
    write_shards(base / "all.jsonl", base / "s", size=64, shard_size="20KB", progress=False)
    return base / "s"


def cfg_for(shards, dataset, out, **over):
    data = {"method": load_yaml("methods/clip-tiny"), "data": {"shards": str(shards), "dataset": dataset,
                                                               "batch_size": 3, "num_workers": 0},
            "out_dir": str(out)}
    overrides = ["method.backbone.image_size=64"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(EvalConfig, data=data, overrides=overrides)


def test_results_file_holds_every_metric(shards, tmp_path):
    cfg = cfg_for(shards, "mpdd", tmp_path, save_overlays=1, paper_compat="true")
    r = evaluate(cfg)
    (path,) = tmp_path.glob("clip-zero-shot-0shot-seed0-*-mpdd.json")
    assert path.name == results_name(cfg)
    saved = json.loads(path.read_text())
    assert saved["images"] == r["images"] == 6 * 4  # 6 classes x (1 good + 3 anomalous species... ) test images
    assert set(saved["mean"]) == METRICS
    for c, m in saved["per_class"].items():
        assert set(m) == METRICS and all(0 <= v <= 1 for v in m.values()), c
    assert saved["code_version"] and saved["config"]["method"]["name"] == "clip"
    assert saved["images_per_second"] > 0 and len(saved["scores"]) == saved["images"]
    assert set(saved["paper_compat"]["anomalyclip_pro"]) == set(saved["per_class"])
    assert path.with_name(path.stem + ".config.yaml").is_file()
    assert len(list((tmp_path / "overlays" / path.stem).glob("*.png"))) == 6
    assert not list(tmp_path.glob("*.tmp*"))


def test_undefined_metrics_are_nan_flagged_and_left_out(shards, tmp_path):
    r = evaluate(cfg_for(shards, "kvasir", tmp_path))  # every image anomalous
    assert math.isnan(r["mean"]["image_auroc"]) and r["undefined"]["image_auroc"] == ["colon"]
    assert 0 <= r["mean"]["pixel_auroc"] <= 1
    h = evaluate(cfg_for(shards, "headct", tmp_path))  # no masks: image metrics only
    assert set(h["mean"]) == {"image_auroc", "image_ap", "image_f1_max"}


def test_config_errors_name_the_key(shards, tmp_path):
    with pytest.raises(ConfigError, match="'method.sigmaa'.*did you mean 'sigma'"):
        cfg_for(shards, "mpdd", tmp_path, **{"method.sigmaa": 1})
    with pytest.raises(ConfigError, match="unknown method 'clipp'.*did you mean 'clip'"):
        cfg_for(shards, "mpdd", tmp_path, **{"method.name": "clipp"})


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(shards, tmp_path):
    args = ["eval", "--method", "methods/clip-tiny", "--shards", str(shards), "--dataset", "mpdd",
            "method.backbone.image_size=64", "data.batch_size=2", "data.num_workers=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # The reference also runs with one thread: same kernels, same float sums as each rank.
    one = subprocess.run([sys.executable, "-m", "zsadx", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "zsadx", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one,) = [json.loads(p.read_text()) for p in (tmp_path / "one").glob("clip-zero-shot-*-mpdd.json")]
    (two,) = [json.loads(p.read_text()) for p in (tmp_path / "two").glob("clip-zero-shot-*-mpdd.json")]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["images"] == one["images"]
    assert [s["key"] for s in two["scores"]] == [s["key"] for s in one["scores"]]
    for c in one["per_class"]:
        for k, v in one["per_class"][c].items():
            assert two["per_class"][c][k] == pytest.approx(v, abs=1e-6), (c, k)
