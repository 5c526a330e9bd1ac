"""Issue 18, grids from given checkpoints: a method with `checkpoints:` (train set -> file) gets no
training cell, its evaluations read the given files (tiny backbone, synthetic shards, real CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_shards
from launch import cache
from launch.grid import expand, load_grid
from zsadx.cli import main
from zsadx.config import load_config, load_yaml

TINY_GRID = "grids/official-weights-tiny"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"), {"mvtec-ad": 1, "visa": 1, "bmad-brain": 1}, size=64)


def tiny_method(config: str = "methods/anomalyclip-tiny"):
    from zsadx.eval.evaluator import EvalConfig
    from zsadx.models.methods.base import build_method

    cfg = load_config(EvalConfig, data={"method": load_yaml(config), "data": {"shards": "-", "dataset": "-"}})
    return build_method(cfg.method)


def write_checkpoint(path: Path, seed: int, config: str = "methods/anomalyclip-tiny") -> Path:
    """A zsadx final.pt of the tiny method with seeded random trainable tensors (nothing trained)."""
    from zsadx.models.checkpoints import save_method_checkpoint

    method = tiny_method(config)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.5 if v.is_floating_point() else v
             for k, v in method.trainable_state_dict().items()}
    method.load_trainable_state_dict(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_method_checkpoint(method, path)


def write_official_anomalyclip(path: Path) -> Path:
    """A synthetic zqhang/AnomalyCLIP ``epoch_N.pth`` at the tiny backbone's widths."""
    from test_official_checkpoints import anomalyclip_file, method

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(anomalyclip_file(method("anomalyclip-tiny").backbone.tokenize), path)
    return path


def overrides(tmp_path: Path, shards: Path, **more) -> list[str]:
    over = {"out_dir": tmp_path / "out", "shards": shards, "checkpoints_root": tmp_path / "weights",
            "cluster": "debug", **more}
    return [f"{k}={v}" for k, v in over.items()]


def eval_means(out: Path) -> dict[str, dict]:
    """Evaluation cell id -> its marker (status, key, result file, mean metrics)."""
    markers = (json.loads(p.read_text()) for p in out.rglob("cell.json"))
    return {m["id"]: m for m in markers if m["id"].startswith("eval/")}


def test_grid_evaluates_given_checkpoints_like_trained_ones_and_a_replaced_file_makes_its_cells_stale(
        tmp_path, shards, capsys):
    # MVTec AD's weights in the official AnomalyCLIP format (converted in memory), VisA's a zsadx final.pt
    weights = tmp_path / "weights" / "anomalyclip"
    files = {"mvtec-ad": write_official_anomalyclip(weights / "mvtec-ad.pt"),
             "visa": write_checkpoint(weights / "visa.pt", seed=2)}
    over = overrides(tmp_path, shards)
    out = tmp_path / "out"

    assert main(["grid", "plan", TINY_GRID, *over]) == 0
    plan = capsys.readouterr().out
    for ts, f in files.items():
        assert f"given     anomalyclip/{ts}: {f} (sha256 {cache.file_sha(f)})" in plan, plan
    assert "train/" not in plan and "0 training and 6 evaluation cells: 6 missing" in plan, plan
    for cell in ("eval/anomalyclip/mvtec-ad/visa/seed0", "eval/anomalyclip/mvtec-ad/bmad-brain/seed0",
                 "eval/anomalyclip/visa/mvtec-ad/seed0", "eval/winclip/zero-shot/mvtec-ad/seed0"):
        assert f"missing   {cell}" in plan

    assert main(["grid", "run", TINY_GRID, *over]) == 0
    assert "6/6 cells ended: 6 done" in capsys.readouterr().out
    assert not (out / "train").exists()
    first = eval_means(out)
    assert len(first) == 6 and {m["status"] for m in first.values()} == {"done"}
    for cell_id, marker in first.items():
        train_set = cell_id.split("/")[2]
        result = json.loads(Path(marker["result"]).read_text())
        expected = str(files[train_set]) if train_set in files else None
        assert marker["checkpoint"] == expected and result["config"]["checkpoint"] == expected

    # Tables show the cells under their train sets, like trained ones.
    assert main(["table", str(out), "--metrics", "image_auroc", "--columns", "train_set", "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split(",")[2:] == ["mvtec-ad", "visa", "zero-shot"], header
    assert main(["table", str(out), "--metrics", "image_auroc", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split(",")[2:] == ["anomalyclip", "winclip"]

    assert main(["grid", "run", TINY_GRID, *over]) == 0
    assert "nothing to do: all 6 cells are done" in capsys.readouterr().out

    # Another file under the same name: exactly the cell that evaluates it is stale, and re-run.
    write_checkpoint(files["visa"], seed=3)
    plan = expand(load_grid(TINY_GRID, over))
    stale = sorted(c.id for c, s in zip(plan.evals, cache.states(plan.evals).values()) if s != "done")
    assert stale == ["eval/anomalyclip/visa/mvtec-ad/seed0"]
    assert main(["grid", "run", TINY_GRID, *over]) == 0
    assert "1/1 cells ended: 1 done" in capsys.readouterr().out
    second = eval_means(out)
    changed = [i for i in first if first[i]["mean"] != second[i]["mean"] or first[i]["updated"] != second[i]["updated"]]
    assert changed == stale
    assert second[stale[0]]["key"] != first[stale[0]]["key"]


def write_grid(tmp_path: Path, shards: Path, method: dict, **spec) -> Path:
    base = {"name": "g", "out_dir": str(tmp_path / "out"), "shards": str(shards), "cluster": "debug",
            "checkpoints_root": str(tmp_path / "weights"), "methods": [method],
            "protocol": {"type": "paper", "datasets": ["mvtec-ad", "visa", "bmad-brain"]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**base, **spec}))
    return path


BOTH = {"mvtec-ad": "a/mvtec.pt", "visa": "a/visa.pt"}


@pytest.mark.parametrize("case, method, expected", [
    ("missing file", {"config": "methods/anomalyclip-tiny", "label": "ac",
                      "checkpoints": {"mvtec-ad": "a/mvtec.pt", "visa": "a/typo.pt"}},
     ["'methods[0].checkpoints' (ac)", "train set 'visa'", "a/typo.pt not found"]),
    ("train and checkpoints", {"config": "methods/anomalyclip-tiny", "label": "ac", "train": "train/anomalyclip-tiny",
                               "checkpoints": BOTH},
     ["'methods[0]' (ac) has both 'train' and 'checkpoints'"]),
    ("a train set without checkpoint", {"config": "methods/anomalyclip-tiny", "label": "ac",
                                        "checkpoints": {"mvtec-ad": "a/mvtec.pt"}},
     ["'methods[0].checkpoints' (ac)", "no checkpoint for train set 'visa' of protocol 'paper'"]),
    ("a name that is no train set", {"config": "methods/anomalyclip-tiny", "label": "ac",
                                     "checkpoints": {**BOTH, "mvtec": "a/mvtec.pt"}},
     ["'mvtec' is not a train set of protocol 'paper' (did you mean 'mvtec-ad'?)", "mvtec-ad, visa"]),
    ("a folder", {"config": "methods/anomalyclip-tiny", "label": "ac", "checkpoints": {**BOTH, "visa": "a"}},
     ["train set 'visa'", "is a folder, not a checkpoint file"]),
])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_bad_checkpoints_are_one_line_before_anything_is_submitted(tmp_path, shards, capsys, case, method,
                                                                   expected, command):
    for name in ("mvtec.pt", "visa.pt"):
        (tmp_path / "weights" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "weights" / "a" / name).write_bytes(b"not read at plan time")
    grid = write_grid(tmp_path, shards, method)
    assert main(["grid", command, str(grid)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"zsadx grid: error: "), err
    for part in expected:
        assert part in err, err
    if case == "missing file":
        assert str(tmp_path / "weights" / "a" / "typo.pt") in err     # the full path, not only the relative one
    assert not (tmp_path / "out").exists()                             # nothing submitted, no folder made


def test_explicit_protocol_and_the_shipped_official_weights_grids_plan(tmp_path, shards):
    # explicit protocol: the train sets named by the grid (a name is enough; no sources are read)
    write_checkpoint(tmp_path / "weights" / "mine.pt", seed=1)
    grid = write_grid(tmp_path, shards, {"config": "methods/anomalyclip-tiny", "label": "ac",
                                         "checkpoints": {"lab-mix": "mine.pt"}},
                      protocol={"type": "explicit"}, train_sets=[{"name": "lab-mix"}], test_sets=["visa", "bmad-brain"])
    plan = expand(load_grid(str(grid)))
    assert not plan.train and [c.id for c in plan.evals] == ["eval/ac/lab-mix/visa/seed0", "eval/ac/lab-mix/bmad-brain/seed0"]
    assert {c.config["checkpoint"] for c in plan.evals} == {str(tmp_path / "weights" / "mine.pt")}
    # The shipped grids, with (placeholder) files at their paths: the paper protocol's and AdaCLIP's
    # train sets all have a checkpoint, and no training cell is made.
    for name, pairs in (("grids/official-weights", {("AnomalyCLIP", "mvtec-ad"), ("AnomalyCLIP", "visa"),
                                                    ("FAPrompt", "mvtec-ad"), ("FAPrompt", "visa"),
                                                    ("ACD-CLIP", "mvtec-ad"), ("ACD-CLIP", "visa")}),
                        ("grids/official-weights-adaclip", {("AdaCLIP", "mvtec-ad+cvc-colondb"),
                                                            ("AdaCLIP", "visa+cvc-clinicdb")})):
        root = tmp_path / name
        for m in load_grid(name).methods:
            for rel in m.checkpoints.values():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(b"placeholder")
        plan = expand(load_grid(name, [f"checkpoints_root={root}"]))
        assert not plan.train
        given = {(c.method, c.train_set) for c in plan.evals if c.config.get("checkpoint")}
        assert given == pairs
        assert all(Path(c.config["checkpoint"]).is_relative_to(root) for c in plan.evals if c.config.get("checkpoint"))
    # AnomalyCLIP's files as its train.sh writes them: 9_12_4_multiscale_visa is trained on MVTec AD
    official = expand(load_grid("grids/official-weights", [f"checkpoints_root={tmp_path / 'grids/official-weights'}"]))
    (to_visa,) = [c for c in official.evals if c.method == "AnomalyCLIP" and c.dataset == "visa"]
    assert to_visa.config["checkpoint"].endswith("anomalyclip/9_12_4_multiscale_visa/epoch_15.pth")


def test_a_grid_cell_evaluates_an_official_anomalyclip_file_as_its_zsadx_import(tmp_path, shards, capsys):
    """Two train sets of an explicit protocol: one given the official-format file (converted in
    memory by the evaluation), one the zsadx checkpoint `zsadx import` writes from it."""
    official = write_official_anomalyclip(tmp_path / "weights" / "epoch_15.pth")
    assert main(["import", "methods/anomalyclip-tiny", str(official), "--out", str(tmp_path / "weights" / "ac.pt")]) == 0
    grid = write_grid(tmp_path, shards, {"config": "methods/anomalyclip-tiny", "label": "ac",
                                         "checkpoints": {"official": "epoch_15.pth", "imported": "ac.pt"}},
                      protocol={"type": "explicit"}, train_sets=[{"name": "official"}, {"name": "imported"}],
                      test_sets=["visa"], eval_overrides=["data.num_workers=0"])
    capsys.readouterr()
    assert main(["grid", "run", str(grid)]) == 0
    assert "2/2 cells ended: 2 done" in capsys.readouterr().out
    cells = eval_means(tmp_path / "out")
    official_res, imported_res = (json.loads(Path(cells[f"eval/ac/{ts}/visa/seed0"]["result"]).read_text())
                                  for ts in ("official", "imported"))
    assert official_res["checkpoint"] == str(official)
    # Same values at the same places: every image's score and every metric (same arithmetic in one
    # process, so only float32 summation order could differ).
    scores = {s["key"]: s["score"] for s in imported_res["scores"]}
    assert len(scores) == len(official_res["scores"]) > 0
    for s in official_res["scores"]:
        assert s["score"] == pytest.approx(scores[s["key"]], rel=1e-6), s["key"]
    assert official_res["mean"].keys() == imported_res["mean"].keys()
    for k, v in official_res["mean"].items():
        assert v == pytest.approx(imported_res["mean"][k], rel=1e-6), k


def test_a_file_replaced_with_the_same_size_and_time_is_hashed_again(tmp_path):
    """`rsync -a` / `cp -p` of other weights over a checkpoint keeps size and mtime: the hash
    cache of a long-lived process (a blocking `grid run`) must not return the old file's sha256."""
    import os

    path = tmp_path / "epoch_15.pth"
    path.write_bytes(b"a" * 64)
    stamp = path.stat().st_mtime_ns
    before = cache.file_sha(path)
    other = tmp_path / "new.pth"
    other.write_bytes(b"b" * 64)
    os.utime(other, ns=(stamp, stamp))
    other_ino = other.stat().st_ino
    other.replace(path)
    assert path.stat().st_mtime_ns == stamp and path.stat().st_size == 64
    renamed_over = cache.file_sha(path)
    assert renamed_over != before
    # in place (the same inode), size and mtime kept; its ctime moves on once the kernel's
    # (coarse) clock has ticked since the rename
    ctime = path.stat().st_ctime_ns
    for _ in range(1000):
        with open(path, "r+b") as f:
            f.write(b"c" * 64)
        os.utime(path, ns=(stamp, stamp))
        if path.stat().st_ctime_ns != ctime:
            break
    assert path.stat().st_ino == other_ino and path.stat().st_mtime_ns == stamp
    assert cache.file_sha(path) not in (before, renamed_over)
