"""Issue 19 goals 3-4 in the evaluator: images normalised on the device, metrics overlapped with
the model in a background thread (the same results file as one stage after another), and a
failure on either side of the queue reaching the caller as its one-line error, without a hang."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_shards, one_error_line, run_cli
from zsadx.config import load_config, load_yaml
from zsadx.data.transforms import EvalTransform
from zsadx.eval.evaluator import TIMING_KEYS, BackgroundStage, EvalConfig, evaluate, results_name

DATASET = "mvtec-ad"
CLASSES = ["bottle", "cable", "wood"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("pipeline"), {DATASET: 2}, size=64)


def eval_cfg(shards: Path, out: Path, method: str = "methods/clip-tiny", **over) -> EvalConfig:
    data = {"method": load_yaml(method), "out_dir": str(out),
            "data": {"shards": str(shards), "dataset": DATASET, "classes": CLASSES, "batch_size": 2,
                     "num_workers": 0}}
    return load_config(EvalConfig, data=data, overrides=[f"{k}={v}" for k, v in over.items()])


def measured_apart(results: dict) -> dict:
    """The results without what measures this run's speed, and without the config (which names the
    switches the runs differ in); the config is compared on its own."""
    return {k: v for k, v in results.items() if k not in TIMING_KEYS and k != "config"}


def saved(out: Path, cfg: EvalConfig) -> dict:
    return json.loads((out / results_name(cfg)).read_text())


def overlay_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "overlays").rglob("*.png"))}


def test_pipelined_and_sequential_write_the_same_results_file(shards, tmp_path):
    piped = eval_cfg(shards, tmp_path / "piped", pipeline="true", save_overlays=1, paper_compat="true",
                     **{"data.num_workers": 1})
    sequential = eval_cfg(shards, tmp_path / "seq", pipeline="false", save_overlays=1, paper_compat="true")
    evaluate(piped)
    evaluate(sequential)
    assert results_name(piped) == results_name(sequential)  # the switch does not change the cell
    a, b = saved(tmp_path / "piped", piped), saved(tmp_path / "seq", sequential)
    assert a["images"] == b["images"] > 0 and len(a["scores"]) == a["images"]
    assert measured_apart(a) == measured_apart(b)
    differ = {k for k in a["config"] if a["config"][k] != b["config"][k]}
    assert differ == {"pipeline", "data", "out_dir"}
    assert overlay_bytes(tmp_path / "piped") == overlay_bytes(tmp_path / "seq") != {}
    for r in (a, b):  # every stage was timed, and the loop took at least as long as its model stage
        assert set(r["stage_seconds"]) == {"load", "model", "metrics", "total"}
        assert r["stage_seconds"]["metrics"] > 0 and r["stage_seconds"]["total"] >= r["stage_seconds"]["model"]


def eval_argv(shards: Path, out: Path, *overrides: str) -> list[str]:
    return ["eval", "--method", "methods/clip-tiny", "--shards", str(shards), "--dataset", DATASET,
            "--classes", *CLASSES, "--out", str(out), "data.num_workers=0", "data.batch_size=2", "save_overlays=1",
            *overrides]


@pytest.mark.parametrize("pipeline", ["true", "false"])
def test_an_error_in_the_metrics_stage_is_one_line_and_keeps_the_earlier_results(shards, tmp_path, capsys,
                                                                                   pipeline):
    """The overlays of the metrics stage cannot be written (a file stands where their folder goes):
    the same one line as without the pipeline; the results file of an earlier run stays as it was."""
    rc, _, err = run_cli(capsys, *eval_argv(shards, tmp_path / "first"))
    assert rc == 0, err
    (earlier,) = (tmp_path / "first").glob("*.json")
    out = tmp_path / "again"
    (out / "overlays").mkdir(parents=True)
    blocker = out / "overlays" / earlier.stem
    blocker.write_text("not a folder")
    kept = out / earlier.name
    kept.write_bytes(earlier.read_bytes())
    rc, stdout, err = run_cli(capsys, *eval_argv(shards, out, f"pipeline={pipeline}"))
    assert rc == 2 and stdout == ""
    line = one_error_line(err)
    assert line.startswith("zsadx eval: error: ") and str(blocker) in line
    assert kept.read_bytes() == earlier.read_bytes()
    assert blocker.read_text() == "not a folder"


def raised_by(fn) -> BaseException | None:
    """What ``fn`` raises, run in a thread that must end within a minute (else: a deadlock)."""
    caught: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - looked at by the caller
            caught.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "deadlock: the producer or the worker is still waiting"
    return caught[0] if caught else None


def test_a_failed_worker_raises_its_own_exception_in_the_caller_and_never_blocks_it():
    boom = RuntimeError("class 'x', batch 2: broken")
    worked: list[int] = []

    def work(i: int) -> None:
        if i == 2:
            raise boom
        worked.append(i)

    def produce():
        with BackgroundStage(work, depth=2) as stage:
            for i in range(500):  # far more than the queue holds: put must not wait on a dead worker
                stage.put(i)

    err = raised_by(produce)
    assert err is boom
    assert worked == [0, 1]  # in order, and nothing after the failure


def test_a_failed_caller_ends_the_worker_and_keeps_its_own_exception():
    seen: list[int] = []

    def produce():
        with BackgroundStage(seen.append, depth=2) as stage:
            for i in range(5):
                stage.put(i)
            raise KeyError("the loader failed")

    err = raised_by(produce)
    assert isinstance(err, KeyError)
    assert seen == list(range(len(seen)))  # what was worked on, was worked on in order


def test_the_last_failure_of_the_worker_surfaces_when_leaving():
    def work(i: int) -> None:
        if i == 3:
            raise ValueError(f"item {i}")

    def produce():
        with BackgroundStage(work) as stage:
            for i in range(4):  # the failing item is the last one: only leaving can report it
                stage.put(i)

    err = raised_by(produce)
    assert str(err) == "item 3"


# ------------------------------------------------------------------------------------------
# Normalisation on the device: uint8 batches give what normalised float batches give
# ------------------------------------------------------------------------------------------

def loader_image_dtype(shards: Path) -> torch.dtype:
    from zsadx.data.loaders import EvalShards

    return next(iter(EvalShards(shards, DATASET, CLASSES[:1], "test", EvalTransform(size=64))))["image"].dtype


@pytest.mark.parametrize("method,shots", [("methods/clip-tiny", 0), ("methods/winclip-tiny", 1)])
def test_uint8_images_are_normalised_on_the_device(shards, tmp_path, monkeypatch, method, shots):
    """Batches and few-shot references decoded as uint8 (the loader) score as the normalised floats
    the loader gave before (``EvalTransform.image`` in its place), and the overlays show the same
    image (they are drawn from the normalised batch)."""
    runs = {}
    for name in ("uint8", "float"):
        if name == "float":
            monkeypatch.setattr(EvalTransform, "pixels", EvalTransform.image)
        assert loader_image_dtype(shards) == {"uint8": torch.uint8, "float": torch.float32}[name]
        cfg = eval_cfg(shards, tmp_path / name, method, save_overlays=1, **{"method.shots": shots})
        runs[name] = evaluate(cfg)
    f, u = runs["float"], runs["uint8"]
    assert f["references"] == u["references"] and (not shots or f["references"])
    assert [s["key"] for s in f["scores"]] == [s["key"] for s in u["scores"]]
    # Same formula on both sides: only the order of float32 operations may differ.
    for x, y in zip(f["scores"], u["scores"]):
        assert y["score"] == pytest.approx(x["score"], rel=1e-5, abs=1e-6)
    for c in f["per_class"]:
        for k, v in f["per_class"][c].items():
            assert u["per_class"][c][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (c, k)
    a, b = overlay_pixels(tmp_path / "float"), overlay_pixels(tmp_path / "uint8")
    assert a.keys() == b.keys() and a
    for name in a:  # a value on a rounding edge may land one step away
        assert np.abs(a[name] - b[name]).max() <= 1, name


def overlay_pixels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=int) for p in sorted((out / "overlays").rglob("*.png"))}


# ------------------------------------------------------------------------------------------
# Metric state on the device: the torch path through evaluate() gives the numpy path's file
# ------------------------------------------------------------------------------------------

def close_metrics(a: dict, b: dict, tol: float = 1e-9) -> None:
    """Per class and mean, each metric equal to ``tol`` (both are exact: only float sums differ)."""
    assert a["per_class"].keys() == b["per_class"].keys()
    for c in a["per_class"]:
        for k, v in a["per_class"][c].items():
            assert b["per_class"][c][k] == pytest.approx(v, abs=tol, rel=0), (c, k)
    for k, v in a["mean"].items():
        assert b["mean"][k] == pytest.approx(v, abs=tol, rel=0), k


def beside_metrics(results: dict) -> dict:
    return {k: v for k, v in measured_apart(results).items() if k not in ("per_class", "mean")}


@pytest.mark.parametrize("method", ["methods/clip-tiny", "methods/fade-tiny"])
def test_metric_state_on_the_device_gives_the_host_results_file(shards, tmp_path, method):
    """On this CPU, metrics_on=device runs the torch path the evaluator takes on a GPU (maps never
    copied to the host, torch sort and scans): the same file as the numpy path, metrics to 1e-9."""
    host = eval_cfg(shards, tmp_path / "host", method, metrics_on="host", save_overlays=1, paper_compat="true")
    dev = eval_cfg(shards, tmp_path / "dev", method, metrics_on="device", save_overlays=1, paper_compat="true")
    for cfg in (host, dev):
        evaluate(cfg)
    assert results_name(host) == results_name(dev)
    a, b = saved(tmp_path / "host", host), saved(tmp_path / "dev", dev)
    close_metrics(a, b)
    assert beside_metrics(a) == beside_metrics(b)  # scores, counts, paper_compat, coverage: equal
    assert overlay_bytes(tmp_path / "host") == overlay_bytes(tmp_path / "dev") != {}
    assert {k for k in a["config"] if a["config"][k] != b["config"][k]} == {"metrics_on", "out_dir"}


def test_auto_keeps_the_metric_state_on_the_host_on_a_cpu_and_on_the_gpu_otherwise():
    from zsadx.eval.evaluator import metric_state_device

    cfg = load_config(EvalConfig, data={"method": load_yaml("methods/clip-tiny"),
                                        "data": {"shards": "-", "dataset": "-"}})
    assert metric_state_device(cfg, torch.device("cpu")) is None
    assert metric_state_device(cfg, torch.device("cuda", 1)) == torch.device("cuda", 1)
    cfg.metrics_on = "host"
    assert metric_state_device(cfg, torch.device("cuda", 0)) is None
    cfg.metrics_on = "device"
    assert metric_state_device(cfg, torch.device("cpu")) == torch.device("cpu")


def test_the_eval_device_is_named_in_full_for_the_metrics_thread(monkeypatch):
    """A thread's current GPU is its own (GPU 0 in a new thread): a rank's "cuda" gets its index."""
    from zsadx.eval.evaluator import eval_device

    assert eval_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # as after set_device(3) on rank 3
    assert eval_device("auto") == torch.device("cuda", 3)
    assert eval_device("cuda") == torch.device("cuda", 3)
    assert eval_device("cuda:1") == torch.device("cuda", 1)


def test_each_classes_pixel_state_is_sized_from_the_index_exactly(shards, tmp_path, monkeypatch):
    """The evaluator allocates each class's pixel scores once, from the index's counts: when every
    image has its pixel truth, the hint is exactly the pixels added (no growth, nothing spare)."""
    from zsadx.eval.metrics import ClassMetrics

    seen = {}
    compute = ClassMetrics.compute

    def spy(self):
        seen[self.name] = (self.expected_pixels, self._all.size, self.pixel_excluded)
        return compute(self)

    monkeypatch.setattr(ClassMetrics, "compute", spy)
    cfg = eval_cfg(shards, tmp_path / "out")
    results = evaluate(cfg)
    assert set(seen) == set(CLASSES)
    side = cfg.method.eval_size or cfg.method.backbone.image_size
    for cls, (hint, added, excluded) in seen.items():
        assert excluded == 0 and added > 0
        assert hint == added == sum(r["cls"] == cls for r in results["scores"]) * side * side
