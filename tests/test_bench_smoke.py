"""The speed benchmarks run (on CPU, tiny CLIP, few images): figures come out, nothing is asserted of them."""
from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO


def bench_module(name: str):
    """A benchmark script as a module (benchmarks/ is not a package; its scripts import each other)."""
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_smoke_mode_gives_every_figure(tmp_path, capsys):
    gpu = bench_module("gpu")
    out = tmp_path / "rows.json"
    rows = gpu.main(["--smoke", "--methods", "clip", "fade", "--json", str(out)])
    printed = capsys.readouterr().out
    assert [(r.method, r.setting) for r in rows] == [("clip", "bf16 best"), ("clip", "fp32 b1"),
                                                     ("fade", "bf16 best"), ("fade", "fp32 b1")]
    for r in rows:
        assert r.images_per_second > 0 and r.batch >= 1 and r.peak_gib is None  # CPU: no device peak
        assert 0 < r.model_share <= 1 and 0 <= r.load_share <= 1 and 0 < r.metrics_share
        assert f"{r.method:12s} {r.backbone:18s}" in printed
    assert [r for r in rows if r.setting == "fp32 b1"] and all(r.batch == 1 for r in rows if r.setting == "fp32 b1")
    assert json.loads(out.read_text())[0]["method"] == "clip"
    assert "model-stage sweep" in printed


def test_eval_pipeline_benchmark_compares_both_paths(capsys):
    bench = bench_module("eval_pipeline")
    bench.main(["--images", "12", "--size", "64", "--batch", "4", "--workers", "0", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert "each stage alone" in printed and "sequential" in printed and "overlapped" in printed
    assert "same metrics in both, every round: True" in printed
