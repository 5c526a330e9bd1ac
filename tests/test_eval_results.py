"""Results files through ``zsadx eval``: one file per cell, trained methods need a checkpoint, and
the user errors of evaluation and tables are one line with exit code 2."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from zsadx.cli import main
from zsadx.config import load_config, load_yaml
from zsadx.data.convert import convert
from zsadx.data.shards import write_shards
from zsadx.data.synthetic import make_raw
from zsadx.eval.evaluator import EvalConfig, results_name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """BTAD (3 classes, train and test splits): few-shot references exist."""
    base = tmp_path_factory.mktemp("resultshards")
    make_raw("btad", base / "raw", seed=3, n=1)
    convert("btad", base / "raw", base / "m", progress=False)
    write_shards(base / "m" / "manifest.jsonl", base / "s", size=64, progress=False)
    return base / "s"


def zsadx_eval(shards, out, *extra, method="methods/clip-tiny", classes=("01",)):
    return main(["eval", "--method", method, "--shards", str(shards), "--dataset", "btad",
                 "--classes", *classes, "--out", str(out), "method.backbone.image_size=64", "data.num_workers=0",
                 *extra])


def test_every_shot_count_and_seed_keeps_its_own_results_file(shards, tmp_path, capsys):
    out = tmp_path / "eval"
    cells = [["method.shots=0"], ["method.shots=1"], ["method.shots=1", "seed=1"]]
    for cell in cells:
        assert zsadx_eval(shards, out, *cell, "save_overlays=1") == 0
    files = sorted(out.glob("*.json"))
    assert [json.loads(f.read_text())["shots"] for f in files] == [0, 1, 1]
    assert sorted(json.loads(f.read_text())["config"]["seed"] for f in files) == [0, 0, 1]
    assert len({f.stem for f in files}) == 3 and all(f.name.startswith("clip-zero-shot-") for f in files)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f.stem for f in files]  # no collision
    # A re-run of one cell replaces its own file only.
    before = {f.name: f.read_bytes() for f in files}
    assert zsadx_eval(shards, out, "method.shots=1", "seed=1", "save_overlays=1") == 0
    after = {f.name: f.read_bytes() for f in out.glob("*.json")}
    assert set(after) == set(before)
    assert [n for n in after if after[n] != before[n]] == [n for n in after if "-1shot-seed1-" in n]
    capsys.readouterr()
    assert main(["table", str(out), "--columns", "shots", "--format", "json", "--metrics", "image_auroc"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["columns"] == ["0", "1"]
    (row,) = [r for r in table["rows"] if r["dataset"].startswith("btad")]
    (zero,), (one,) = row["0"], row["1"]
    assert zero[1] is None and one[1] is not None  # shots=1 is a mean over seeds 0 and 1 (a std)


def _cfg(shards, out, *overrides):
    data = {"method": load_yaml("methods/clip-tiny"), "data": {"shards": str(shards), "dataset": "btad"},
            "out_dir": str(out)}
    return load_config(EvalConfig, data=data, overrides=list(overrides))


def test_method_config_checkpoint_and_classes_change_the_name(shards, tmp_path):
    base = results_name(_cfg(shards, tmp_path))
    assert base.startswith("clip-zero-shot-0shot-seed0-") and base.endswith("-btad.json")
    assert results_name(_cfg(shards, tmp_path)) == base                       # deterministic
    assert results_name(_cfg(shards, tmp_path, "method.sigma=0")) != base
    assert results_name(_cfg(shards, tmp_path, "data.classes=['01']")) != base
    assert results_name(_cfg(shards, tmp_path, "data.batch_size=3")) == base  # same numbers, same cell
    # Two checkpoints with the same file name, in different folders: two cells.
    a, b = tmp_path / "a" / "final.pt", tmp_path / "b" / "final.pt"
    for path, value in ((a, 0.0), (b, 1.0)):
        path.parent.mkdir()
        torch.save({"w": torch.full((2,), value)}, path)
    na, nb = (results_name(_cfg(shards, tmp_path, f"checkpoint={p}")) for p in (a, b))
    assert na != nb and na.startswith("clip-final-0shot-seed0-")
    # A checkpoint folder (a training step) is identified by the content of its files.
    step = tmp_path / "step-00000004"
    step.mkdir()
    torch.save({"w": torch.zeros(2)}, step / "trainer.pt")
    first = results_name(_cfg(shards, tmp_path, f"checkpoint={step}"))
    torch.save({"w": torch.ones(2)}, step / "trainer.pt")
    assert results_name(_cfg(shards, tmp_path, f"checkpoint={step}")) != first
    assert first.startswith("clip-step-00000004-0shot-seed0-")


def test_trained_method_without_checkpoint_is_an_error_unless_untrained(shards, tmp_path, capsys):
    assert zsadx_eval(shards, tmp_path / "a", method="methods/anomalyclip-tiny") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("zsadx eval: error:")
    assert "'anomalyclip'" in err and "--checkpoint FILE" in err and "untrained=true" in err
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").glob("*.json"))
    assert zsadx_eval(shards, tmp_path / "b", "untrained=true", method="methods/anomalyclip-tiny") == 0
    (result,) = (tmp_path / "b").glob("*.json")
    assert result.name.startswith("anomalyclip-untrained-0shot-seed0-") and "zero-shot" not in result.name
    capsys.readouterr()
    assert zsadx_eval(shards, tmp_path / "c", "untrained=true") == 2       # clip has nothing to train
    assert "no trainable parameters" in capsys.readouterr().err


def _garble_first_train_json(shards: Path, copy: Path) -> tuple[Path, str]:
    """A copy of the shards with the json member of the first train sample of class 01 garbled."""
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    (group,) = [g for g in index["groups"] if g["cls"] == "01" and g["split"] == "train"]
    tar_path = copy / group["shards"][0]["name"]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(m.name for m, _ in members if m.name.endswith(".json"))
    key = first[:first.find(".", first.rfind("/") + 1)]  # the sample key, as the tar readers split it
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == first:
                data = b'{"label": 0, "cls": "01", '  # cut short
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return tar_path, key


def test_garbled_reference_json_names_the_shard_and_sample(shards, tmp_path, capsys):
    tar_path, key = _garble_first_train_json(shards, tmp_path / "s")
    assert zsadx_eval(tmp_path / "s", tmp_path / "out", "method.shots=1") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tar_path) in err and f"'{key}'" in err and "zsadx data shard" in err


def test_metric_typo_in_table_is_an_error_with_a_suggestion(shards, tmp_path, capsys):
    assert zsadx_eval(shards, tmp_path) == 0
    capsys.readouterr()
    assert main(["table", str(tmp_path), "--metrics", "image_aurc,pixel_auroc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("zsadx table: error:")
    assert "'image_aurc'" in err and "did you mean 'image_auroc'" in err and "pixel_aupro" in err


@pytest.mark.parametrize("override, key", [("data.batch_size=0", "'data.batch_size'"),
                                           ("data.num_workers=-1", "'data.num_workers'"),
                                           ("save_overlays=-2", "'save_overlays'")])
def test_values_that_would_fail_later_fail_at_validation(shards, tmp_path, capsys, override, key):
    assert zsadx_eval(shards, tmp_path, override) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and key in err
    assert not list(tmp_path.glob("*.json"))
