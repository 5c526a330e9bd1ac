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


def test_demo_writes_resolved_config_and_results(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "zsadx", "demo", f"out_dir={out}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.yaml").is_file()
    result = json.loads((out / "result.json").read_text())
    rows = {(r["method"], r["dataset"]) for r in result["table"]}
    assert rows == {("winclip 0-shot", "mvtec-ad"), ("winclip 0-shot", "bmad-brain"),
                    ("fade 1-shot", "mvtec-ad"), ("fade 1-shot", "bmad-brain")}
    assert all(0 <= r["pixel_auroc"] <= 1 for r in result["table"])
    assert (out / "shards" / "index.json").is_file() and (out / "results" / "fade-zero-shot-mvtec-ad.json").is_file()
    assert "image_auroc" in proc.stdout and "fade 1-shot" in proc.stdout
