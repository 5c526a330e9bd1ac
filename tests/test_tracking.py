"""Experiment tracking through Accelerate's trackers: the files TensorBoard and offline wandb write,
read back after a real ``zsadx train`` and a real ``zsadx eval``; grid cells' tags."""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import launch_cmd, make_shards, one_error_line, run_checked, run_cli

pytestmark = pytest.mark.slow

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
# MLflow is checked where it is installed (mlflow or mlflow-skinny), through a file store.
MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not MLFLOW, reason="mlflow is not installed")
TRAIN_TRACKERS = "tracking.log_with=[wandb, mlflow]" if MLFLOW else "tracking.log_with=[wandb]"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("tracking"), {"mvtec-ad": 2})


def train_cmd(shards: Path, out: Path, *overrides: str) -> list[str]:
    return launch_cmd(1, "zsadx.train", "--config", "train/anomalyclip-tiny",
                      f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]", f"out_dir={out}", "progress=false",
                      "log_every=1", "data.batch_size=2", "data.num_workers=0", *overrides)


# ----------------------------------------------------------------------------------------------
# Readers of what the trackers wrote (independent of zsadx)
# ----------------------------------------------------------------------------------------------

def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_images(folder: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


def wandb_records(run_dir: Path) -> list:
    """The records of an offline wandb run: its ``run-<id>.wandb`` file is a LevelDB log (32 KiB
    blocks of chunks with a 7-byte header: crc32c, length, type) after a 7-byte ``:W&B`` header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """Its run record (id, name, tags, group) and its history {key: [(step, value)]}."""
    run, history = None, {}
    for rec in wandb_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            step = items.pop("_step")
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((step, v))
    return {"id": run.run_id, "name": run.display_name, "project": run.project, "tags": list(run.tags),
            "group": run.run_group, "job_type": run.job_type, "history": history}


def mlflow_run(logging_dir: Path, run_id: str | None = None) -> dict:
    """The run in the file store under ``logging_dir`` (the only one, or ``run_id``): name, tags,
    params, metric histories {key: [(step, value)]} and artifact paths."""
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(logging_dir / "mlruns").as_uri())
    if run_id is None:
        (exp,) = [e for e in client.search_experiments() if e.name == "zsadx"]
        (run,) = client.search_runs([exp.experiment_id])
        run_id = run.info.run_id
    run = client.get_run(run_id)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}

    def artifacts(path=None):
        for a in client.list_artifacts(run_id, path):
            yield from (artifacts(a.path) if a.is_dir else [a.path])

    return {"id": run_id, "name": run.data.tags.get("mlflow.runName"), "tags": run.data.tags,
            "params": run.data.params, "history": history, "artifacts": list(artifacts())}


def offline_runs(logging_dir: Path) -> list[Path]:
    return sorted((logging_dir / "wandb").glob("offline-run-*"))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> tuple[Path, str]:
    """3 steps, checkpoints at 2 and 3; TensorBoard through the old ``tensorboard: true`` alias."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    proc = run_checked(train_cmd(shards, out, "max_steps=3", "checkpoint_every=2", "tensorboard=true",
                                 TRAIN_TRACKERS, "tracking.tags={lab: vision}"))
    return out, proc.stderr


def test_training_logs_loss_parts_lr_and_speed_to_tensorboard_and_offline_wandb(trained):
    out, stderr = trained
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "tensorboard: true is deprecated" in stderr
    # TensorBoard (through the alias): every float of the log, under train/, at its step.
    tb = tb_scalars(out / "trackers" / "zsadx")
    for key in ("loss", "lr", "samples_per_second", "global", "local", "epoch"):
        steps = [s for s, _ in tb[f"train/{key}"]]
        assert steps == [1, 2, 3], key
        for (_, v), rec in zip(tb[f"train/{key}"], log):
            assert v == pytest.approx(rec[key], rel=1e-6)  # stored as float32
    # wandb, offline, in the run's trackers folder; the id is kept for a resume.
    (run_dir,) = offline_runs(out / "trackers")
    run = wandb_run(run_dir)
    assert run["id"] == json.loads((out / "trackers.json").read_text())["wandb"]
    assert run["name"] == "run" and run["project"] == "zsadx" and run["job_type"] == "train"
    assert "lab=vision" in run["tags"]
    assert [s for s, _ in run["history"]["train/loss"]] == [1, 2, 3]
    assert [v for _, v in run["history"]["train/loss"]] == pytest.approx([r["loss"] for r in log], rel=1e-12)


def test_resumed_training_continues_its_tracker_runs(trained, shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    # Killed after step 3 was logged but before its checkpoint: the resume starts at step 2.
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "final.pt").unlink()
    run_checked(train_cmd(shards, out, "max_steps=4", "checkpoint_every=2", "tensorboard=true",
                          TRAIN_TRACKERS, "tracking.tags={lab: vision}", "resume=latest"))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # Same TensorBoard folder; the killed run's step 3 is purged, the resumed run's step 3 stays.
    tb = tb_scalars(out / "trackers" / "zsadx")
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    # wandb: the resumed run logs under the first run's id (``wandb sync`` joins them).
    first, second = offline_runs(out / "trackers")
    assert wandb_run(first)["id"] == wandb_run(second)["id"]
    assert [s for s, _ in wandb_run(second)["history"]["train/loss"]] == [3, 4]
    if MLFLOW:  # the same MLflow run, continued (its history keeps both step 3s)
        run = mlflow_run(out / "trackers", json.loads((out / "trackers.json").read_text())["mlflow"])
        assert run["id"] == json.loads((trained[0] / "trackers.json").read_text())["mlflow"]
        assert [s for s, _ in run["history"]["train/loss"]] == [1, 2, 3, 3, 4]
        assert run["history"]["train/loss"][-1][1] == pytest.approx(log[-1]["loss"], rel=1e-12)


def test_overwrite_deletes_the_runs_tracker_files(trained, shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    old_id = json.loads((out / "trackers.json").read_text())["wandb"]
    run_checked(train_cmd(shards, out, "max_steps=1", "tracking.log_with=[wandb, tensorboard]", "overwrite=true"))
    (run_dir,) = offline_runs(out / "trackers")  # the old run's offline folder is gone
    assert wandb_run(run_dir)["id"] != old_id
    assert [s for s, _ in tb_scalars(out / "trackers" / "zsadx")["train/loss"]] == [1]


@needs_mlflow
def test_training_logs_to_an_mlflow_file_store(trained):
    out = trained[0]
    run = mlflow_run(out / "trackers")
    assert run["id"] == json.loads((out / "trackers.json").read_text())["mlflow"]
    assert run["name"] == "run" and run["tags"]["lab"] == "vision"
    assert run["params"]["optim.lr"] == "0.001" and run["params"]["max_steps"] == "3"
    log = read_log(out)
    for key in ("loss", "lr", "samples_per_second", "global", "local"):
        assert [s for s, _ in run["history"][f"train/{key}"]] == [1, 2, 3], key
        assert [v for _, v in run["history"][f"train/{key}"]] == pytest.approx([r[key] for r in log], rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def test_eval_logs_per_class_and_mean_metrics_and_overlays(shards, tmp_path, capsys):
    out = tmp_path / "eval"
    rc, _, err = run_cli(capsys, "eval", "--method", "methods/winclip-tiny", "--shards", shards, "--dataset",
                         "mvtec-ad", "--classes", "bottle", "cable", "carpet", "--out", out, "data.num_workers=0",
                         "progress=false", f"tracking.log_with=[tensorboard, wandb{', mlflow' if MLFLOW else ''}]",
                         "tracking.images=2",
                         "tracking.run_name=winclip-mvtec", "tracking.tags={lab: vision}")
    assert rc == 0, err
    (result,) = out.glob("winclip-*-mvtec-ad.json")
    res = json.loads(result.read_text())
    expected = {f"eval/mvtec-ad/mean/{k}": v for k, v in res["mean"].items()}
    expected.update({f"eval/mvtec-ad/{c}/{k}": v for c, m in res["per_class"].items() for k, v in m.items()})
    expected = {k: v for k, v in expected.items() if v is not None and v == v}  # undefined ones are left out
    assert len(expected) >= 3 * 4  # three classes, image and pixel metrics
    tb = tb_scalars(out / "trackers" / "zsadx")
    for key, value in expected.items():
        assert tb[key] == [(0, pytest.approx(value, rel=1e-6))], key
    # Two overlays (tracking.images=2) of the one per class that tracking had saved.
    assert len(list((out / "overlays").rglob("*.png"))) == 3
    images = tb_images(out / "trackers" / "zsadx")
    assert len(images) == 2 and all(t.startswith("eval/mvtec-ad/overlays/") for t in images)
    (run_dir,) = offline_runs(out / "trackers")
    run = wandb_run(run_dir)
    assert run["name"] == "winclip-mvtec" and run["job_type"] == "eval" and "lab=vision" in run["tags"]
    for key, value in expected.items():
        assert run["history"][key] == [(0, pytest.approx(value, rel=1e-12))], key
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 2
    if MLFLOW:
        run = mlflow_run(out / "trackers")
        assert run["name"] == "winclip-mvtec" and run["tags"]["lab"] == "vision"
        for key, value in expected.items():
            assert run["history"][key] == [(0, pytest.approx(value, rel=1e-12))], key
        assert len(run["artifacts"]) == 2 and all(a.startswith("eval/mvtec-ad/overlays/") for a in run["artifacts"])


def test_unknown_tracker_and_missing_package_are_one_line_errors(shards, capsys, tmp_path):
    base = ["eval", "--method", "methods/winclip-tiny", "--shards", shards, "--dataset", "mvtec-ad", "--out",
            tmp_path / "e"]
    rc, _, err = run_cli(capsys, *base, "tracking.log_with=[tensorbord]")
    line = one_error_line(err)
    assert rc == 2 and "'tracking.log_with[0]'" in line and "did you mean 'tensorboard'" in line
    assert "known trackers: " in line and "wandb" in line and "mlflow" in line
    from zsadx.tracking import PACKAGES

    missing = next(n for n in ("clearml", "aim", "swanlab", "comet_ml") if importlib.util.find_spec(PACKAGES[n]) is None)
    rc, _, err = run_cli(capsys, "train", "--config", "train/anomalyclip-tiny",
                         f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]", f"out_dir={tmp_path / 't'}",
                         f"tracking.log_with=[tensorboard, {missing}]")
    line = one_error_line(err)
    assert rc == 2 and "'tracking.log_with[1]'" in line and f"pip install {PACKAGES[missing]}" in line
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()  # refused before anything ran
    rc, _, err = run_cli(capsys, *base, "tracking.wandb_mode=offlne")
    assert rc == 2 and "'tracking.wandb_mode'" in one_error_line(err)


# ----------------------------------------------------------------------------------------------
# Grid cells
# ----------------------------------------------------------------------------------------------

def test_grid_cells_name_group_and_tag_their_tracker_runs(shards, tmp_path):
    from launch import fanout
    from launch.grid import GridConfig, expand
    from launch.jobs import CellJob, cell_tracking
    from zsadx.config import load_config
    from zsadx.training.config import TrainConfig

    spec = {"name": "study", "out_dir": str(tmp_path / "grid"), "shards": str(shards), "cluster": "debug",
            "protocol": {"type": "explicit"}, "test_sets": ["mvtec-ad"],
            "train_sets": [{"name": "mvtec-ad", "sources": [{"dataset": "mvtec-ad"}]}],
            "methods": [{"config": "methods/winclip-tiny"},
                        {"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny"}],
            "eval_overrides": ["data.classes=[bottle]", "data.num_workers=0", "tracking.log_with=[wandb]"]}
    plan = expand(load_config(GridConfig, data=spec))
    todo = fanout.todo(plan)
    assert todo.grid == "study"
    # A training cell: the config its job writes (train.yaml) carries the cell's name and tags.
    train = fanout._spec(plan.train[0], None, grid=todo.grid)
    tcfg = load_config(TrainConfig, data={**train["config"], "tracking": cell_tracking(train)})
    assert tcfg.tracking.run_name == "train/anomalyclip/mvtec-ad/seed0"
    assert tcfg.tracking.tags == {"grid": "study", "cell": "train/anomalyclip/mvtec-ad/seed0",
                                  "method": "anomalyclip", "train_set": "mvtec-ad", "seed": "0"}
    # An evaluation cell, run as its job runs it: its offline wandb run is named, grouped and tagged.
    (cell,) = [c for c in plan.evals if c.method == "winclip"]
    CellJob(fanout._spec(cell, None, grid=todo.grid))()
    (run_dir,) = offline_runs(cell.folder / "trackers")
    run = wandb_run(run_dir)
    assert run["name"] == cell.id == "eval/winclip/zero-shot/mvtec-ad/seed0" and run["group"] == "study"
    assert set(run["tags"]) == {"grid=study", f"cell={cell.id}", "method=winclip", "train_set=zero-shot",
                                "seed=0", "test_set=mvtec-ad", "shots=0"}
    (result,) = cell.folder.glob("winclip-*-mvtec-ad.json")
    mean = json.loads(result.read_text())["mean"]
    assert run["history"]["eval/mvtec-ad/mean/image_auroc"] == [(0, pytest.approx(mean["image_auroc"], rel=1e-12))]


def test_a_grids_tracking_section_reaches_every_cell_and_overrides_still_win(shards, tmp_path):
    """``tracking:`` in the grid: every training and evaluation cell logs to those trackers (no
    override per method needed); an ``eval_overrides`` entry still wins for the evaluation cells."""
    from launch import fanout
    from launch.grid import GridConfig, expand
    from launch.jobs import CellJob
    from zsadx.config import load_config

    spec = {"name": "study", "out_dir": str(tmp_path / "grid"), "shards": str(shards), "cluster": "debug",
            "protocol": {"type": "explicit"}, "test_sets": ["mvtec-ad"],
            "train_sets": [{"name": "mvtec-ad", "sources": [{"dataset": "mvtec-ad"}]}],
            "methods": [{"config": "methods/winclip-tiny"},
                        {"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny"}],
            "tracking": {"log_with": ["tensorboard"], "project": "study-tb"},
            "eval_overrides": ["data.classes=[bottle]", "data.num_workers=0", "tracking.images=0"]}
    plan = expand(load_config(GridConfig, data=spec))
    (train,) = plan.train
    assert train.config["tracking"]["log_with"] == ["tensorboard"] and train.config["tracking"]["project"] == "study-tb"
    assert train.config["tracking"]["images"] == 4                     # the grid's section, whole
    assert {c.config["tracking"]["images"] for c in plan.evals} == {0}  # the override wins
    assert all(c.config["tracking"]["log_with"] == ["tensorboard"] for c in plan.evals)
    # A cell's run logs there: its mean metrics in TensorBoard, no overlays (images=0).
    (cell,) = [c for c in plan.evals if c.method == "winclip"]
    CellJob(fanout._spec(cell, None, grid=fanout.todo(plan).grid))()
    (result,) = cell.folder.glob("winclip-*-mvtec-ad.json")
    mean = json.loads(result.read_text())["mean"]
    tb = tb_scalars(cell.folder / "trackers" / "study-tb")
    assert tb["eval/mvtec-ad/mean/image_auroc"] == [(0, pytest.approx(mean["image_auroc"], rel=1e-6))]
    assert tb_images(cell.folder / "trackers" / "study-tb") == []
    # Tracking is no part of a cell's identity: the same cells, keys and folders as without it.
    bare = expand(load_config(GridConfig, data={k: v for k, v in spec.items() if k != "tracking"}))
    assert [(c.id, c.folder) for c in bare.evals] == [(c.id, c.folder) for c in plan.evals]
    assert fanout.todo(bare).grid == fanout.todo(plan).grid


@pytest.mark.parametrize("tracker", ["wandb"] + (["mlflow"] if MLFLOW else []))
def test_an_evaluation_logs_to_one_tracker_alone_in_a_fresh_process(shards, tmp_path, tracker):
    """A fresh ``zsadx eval`` process with one tracker and no Accelerator anywhere (a grid cell's job
    is such a process): Accelerate's trackers need its state, which nothing else had made."""
    import sys

    out = tmp_path / "eval"
    run_checked([sys.executable, "-m", "zsadx", "eval", "--method", "methods/winclip-tiny", "--shards", str(shards),
                 "--dataset", "mvtec-ad", "--classes", "bottle", "--out", str(out), "data.num_workers=0",
                 "progress=false", f"tracking.log_with=[{tracker}]", "tracking.run_name=alone"])
    (result,) = out.glob("winclip-*-mvtec-ad.json")
    mean = json.loads(result.read_text())["mean"]
    run = wandb_run(offline_runs(out / "trackers")[0]) if tracker == "wandb" else mlflow_run(out / "trackers")
    assert run["name"] == "alone"
    assert run["history"]["eval/mvtec-ad/mean/image_auroc"] == [(0, pytest.approx(mean["image_auroc"], rel=1e-12))]


@needs_mlflow
def test_runs_one_after_another_in_a_process_each_keep_their_own_mlflow_store(shards, tmp_path, capsys, monkeypatch):
    """MLflow exports its tracking URI to the environment: a run's own file store must not become
    the next run's (a local grid runs its cells one after another in one process), nor leak into
    the processes started later. A URI the user set is still used, and kept."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        rc, _, err = run_cli(capsys, "eval", "--method", "methods/winclip-tiny", "--shards", shards, "--dataset",
                             "mvtec-ad", "--classes", "bottle", "--out", out, "data.num_workers=0", "progress=false",
                             "tracking.log_with=[mlflow]", f"tracking.run_name={out.name}")
        assert rc == 0, err
        assert "MLFLOW_TRACKING_URI" not in os.environ
    for out in outs:
        assert mlflow_run(out / "trackers")["name"] == out.name  # one run in each store: its own
    users = tmp_path / "users-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (users / "mlruns").as_uri())
    rc, _, err = run_cli(capsys, "eval", "--method", "methods/winclip-tiny", "--shards", shards, "--dataset",
                         "mvtec-ad", "--classes", "bottle", "--out", tmp_path / "third", "data.num_workers=0",
                         "progress=false", "tracking.log_with=[mlflow]", "tracking.run_name=third")
    assert rc == 0, err
    assert os.environ["MLFLOW_TRACKING_URI"] == (users / "mlruns").as_uri()
    assert mlflow_run(users)["name"] == "third" and not (tmp_path / "third" / "trackers" / "mlruns").exists()
