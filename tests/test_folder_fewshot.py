"""Issue 20 item 6: a ``folder`` dataset with ``train/normal/`` gives few-shot methods their references.

A user's own images (``normal/``, ``anomalous/``, ``masks/``) held no train split, so ``method.shots=1``
could not be asked for. ``<root>/train/normal/`` now becomes the ``train`` split the evaluator draws
its references from; the old layout converts as before.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import one_error_line, run_cli
from zsadx.data import drawing
from zsadx.data.records import read_manifest


def _own_images(root, references: int):
    """A lab's own folder: 3 normal, 3 anomalous (2 with masks) and ``references`` train/normal images."""
    rng = np.random.default_rng(7)
    for k in range(3):
        drawing.save(root / "normal" / f"n{k}.png", drawing.sample(64, 64, rng, False)[0])
        img, mask = drawing.sample(64, 64, rng, True)
        drawing.save(root / "anomalous" / f"a{k}.png", img)
        if k < 2:
            drawing.save_mask(root / "masks" / f"a{k}_mask.png", mask)
    for k in range(references):
        drawing.save(root / "train" / "normal" / f"ref{k}.png", drawing.sample(64, 64, rng, False)[0])


def _convert_and_shard(capsys, root, base):
    assert run_cli(capsys, "data", "convert", "folder", "--root", root, "--out", base / "m")[0] == 0
    assert run_cli(capsys, "data", "shard", base / "m", "--out", base / "s", "--size", "64")[0] == 0
    return base / "s"


def _eval(capsys, shards, out, shots: int):
    return run_cli(capsys, "eval", "--method", "methods/winclip-tiny", "--shards", shards, "--dataset", "folder",
                   "--out", out, f"method.shots={shots}", "data.num_workers=0")


def test_train_normal_becomes_the_train_split_and_is_never_scored(tmp_path, capsys):
    root = tmp_path / "widget"
    _own_images(root, references=2)
    assert run_cli(capsys, "data", "convert", "folder", "--root", root, "--out", tmp_path / "m")[0] == 0
    splits = {r.key: (r.split, r.label) for r in read_manifest(tmp_path / "m")}
    assert {k: v for k, v in splits.items() if v[0] == "train"} == {
        "train/normal/ref0": ("train", 0), "train/normal/ref1": ("train", 0)}
    assert sum(s == "test" for s, _ in splits.values()) == 6


def test_few_shot_eval_draws_its_reference_from_train_normal(tmp_path, capsys):
    root = tmp_path / "widget"
    _own_images(root, references=2)
    shards = _convert_and_shard(capsys, root, tmp_path)
    rc, _, err = _eval(capsys, shards, tmp_path / "r", shots=1)
    assert rc == 0, err
    (path,) = (tmp_path / "r").glob("*.json")
    results = json.loads(path.read_text())
    assert results["shots"] == 1
    (key,) = results["references"]["widget"]
    assert key in {"train/normal/ref0", "train/normal/ref1"}
    assert results["images"] == 6  # the references are not scored


def test_without_train_normal_the_old_layout_still_works_and_shots_fail_in_one_line(tmp_path, capsys):
    root = tmp_path / "widget"
    _own_images(root, references=0)
    assert not (root / "train").exists()
    shards = _convert_and_shard(capsys, root, tmp_path)
    assert {r.split for r in read_manifest(tmp_path / "m")} == {"test"}
    assert _eval(capsys, shards, tmp_path / "zero", shots=0)[0] == 0  # zero-shot as before
    rc, _, err = _eval(capsys, shards, tmp_path / "few", shots=1)
    assert rc == 2
    line = one_error_line(err)
    assert "few-shot needs 1 normal 'train' images of class 'widget'" in line and "hold 0" in line
    assert "train/normal/" in line  # the error says how to give the folder dataset references


@pytest.mark.parametrize("left", ["train/normal", "train"])
def test_an_empty_train_normal_or_a_bare_train_folder_adds_nothing(tmp_path, capsys, left):
    root = tmp_path / "widget"
    _own_images(root, references=1)
    shutil.rmtree(root / "train")
    (root / left).mkdir(parents=True)
    assert run_cli(capsys, "data", "convert", "folder", "--root", root, "--out", tmp_path / "m")[0] == 0
    assert {r.split for r in read_manifest(tmp_path / "m")} == {"test"}


# --- `--hold-out N`: seeded normals of the test split become the references ------------------------

def _convert_holding_out(capsys, root, out, count: int, seed: int = 0):
    return run_cli(capsys, "data", "convert", "folder", "--root", root, "--out", out, "--hold-out", str(count),
                   "--hold-out-seed", str(seed))


def test_hold_out_moves_seeded_normals_into_the_train_split_listed_in_manifest_and_summary(tmp_path, capsys):
    root = tmp_path / "widget"
    _own_images(root, references=0)
    rc, out, err = _convert_holding_out(capsys, root, tmp_path / "m", 2, seed=3)
    assert rc == 0, err
    assert "held out 2 normal image(s) per class" in out
    records = read_manifest(tmp_path / "m")
    train = sorted(r.key for r in records if r.split == "train")
    assert len(train) == 2 and all(k.startswith("normal/") for k in train)
    assert all(r.label == 0 for r in records if r.split == "train")
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["held_out"] == {"per_class": 2, "seed": 3, "keys": {"widget": train}}
    assert summary["class_counts"]["widget"]["test_normal"] == 1
    # The draw is seeded: the same seed gives the same keys, and across seeds the draws differ.
    draws = set()
    for seed in range(6):
        assert _convert_holding_out(capsys, root, tmp_path / f"s{seed}", 2, seed=seed)[0] == 0
        draws.add(tuple(sorted(r.key for r in read_manifest(tmp_path / f"s{seed}") if r.split == "train")))
    assert tuple(train) in draws and len(draws) > 1
    assert _convert_holding_out(capsys, root, tmp_path / "again", 2, seed=3)[0] == 0
    assert sorted(r.key for r in read_manifest(tmp_path / "again") if r.split == "train") == train


def test_few_shot_eval_draws_from_the_held_out_normals_which_are_never_scored(tmp_path, capsys):
    root = tmp_path / "widget"
    _own_images(root, references=0)
    assert _convert_holding_out(capsys, root, tmp_path / "m", 1)[0] == 0
    (held,) = json.loads((tmp_path / "m" / "summary.json").read_text())["held_out"]["keys"]["widget"]
    assert run_cli(capsys, "data", "shard", tmp_path / "m", "--out", tmp_path / "s", "--size", "64")[0] == 0
    rc, _, err = _eval(capsys, tmp_path / "s", tmp_path / "r", shots=1)
    assert rc == 0, err
    results = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert results["references"]["widget"] == [held]
    assert results["images"] == 5 and held not in {s["key"] for s in results["scores"]}


@pytest.mark.parametrize("count, references, expected", [
    (3, 0, "hold out at most 2 so the test split keeps a normal one"),
    (1, 1, "already has a train split"),
])
def test_a_hold_out_the_class_cannot_give_is_one_line_and_writes_nothing(tmp_path, capsys, count, references,
                                                                          expected):
    root = tmp_path / "widget"
    _own_images(root, references=references)
    rc, _, err = _convert_holding_out(capsys, root, tmp_path / "m", count)
    assert rc == 2
    line = one_error_line(err)
    assert "class 'widget'" in line and expected in line
    assert not (tmp_path / "m" / "manifest.jsonl").exists()
