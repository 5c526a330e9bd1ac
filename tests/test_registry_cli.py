"""Registries and the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zsadx.cli import main
from zsadx.registry import Registry, UnknownNameError


def test_registry_names_aliases_and_suggestions():
    reg = Registry("dataset")
    reg.register("mvtec-ad", "entry", aliases=("mvtec", "MVTec_AD"))
    assert reg.get("MVTEC") == "entry" and reg.get("mvtec_ad") == "entry"
    assert "mvtec" in reg and "visa" not in reg
    with pytest.raises(UnknownNameError, match="unknown dataset 'mvtek'.*did you mean 'mvtec'"):
        reg.get("mvtek")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("mvtec-ad", "again")
    with pytest.raises(ValueError, match="alias"):
        reg.register("other", "x", aliases=("mvtec",))


def test_cli_list(capsys):
    assert main(["list", "methods"]) == 0
    assert main(["list", "datasets"]) == 0
    assert main(["list", "backbones"]) == 0
    assert "tiny" in capsys.readouterr().out


def test_cli_reports_config_errors(capsys, tmp_path):
    assert main(["demo", f"out_dir={tmp_path}", "image_sise=3"]) == 2
    err = capsys.readouterr().err
    assert "image_sise" in err and "did you mean 'image_size'" in err


def test_demo_runs_the_demo_grid_and_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "zsadx", "demo", f"out_dir={out}"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.yaml").is_file() and (out / "shards" / "index.json").is_file()
    result = json.loads((out / "result.json").read_text())
    table = result["table"]
    assert table["columns"] == ["winclip", "fade-1shot", "anomalyclip"]
    rows = [r["dataset"] for r in table["rows"]]
    assert rows == ["visa", "mvtec-ad", "industrial average", "bmad-brain", "medical average"]
    for r in table["rows"]:
        for c in table["columns"]:
            assert all(v is not None and 0 <= v[0] <= 1 for v in r[c]), (r["dataset"], c)  # nothing missing
    assert (out / "table.png").is_file() and "| industrial | visa |" in proc.stdout
    assert (out / "grid" / "train" / "anomalyclip" / "mvtec-ad" / "seed0" / "run" / "final.pt").is_file()
    # Running it again finds every cell done and submits nothing.
    again = subprocess.run([sys.executable, "-m", "zsadx", "demo", f"out_dir={out}"], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and json.loads((out / "result.json").read_text())["submitted"] == \
        {"train": 0, "eval": 0, "jobs": []}
