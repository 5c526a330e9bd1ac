"""Issue 16, grids: one run per grid folder, unique temp names, exit codes and progress, path-safe
names, datasets the shards lack, and the demo's overrides (real files, real CLI, real processes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_shards, subprocess_env
from launch import cache
from launch.grid import expand, load_grid
from zsadx.cli import main


def write_grid(path: Path, **spec) -> Path:
    base = {"name": "g", "cluster": "debug", "methods": [{"config": "methods/clip-tiny", "label": "clip"}],
            "eval_overrides": ["data.num_workers=0"]}
    path.write_text(yaml.safe_dump({**base, **spec}))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """visa and bmad-brain, one image per group; no btad."""
    return make_shards(tmp_path_factory.mktemp("data"), {"visa": 1, "bmad-brain": 1}, size=64)


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ---- case 6: one run per grid folder; unique temp names ---------------------------------------

def test_second_run_of_a_grid_refuses_naming_the_holder_and_waits_with_wait_lock(tmp_path, shards, capsys):
    grid = write_grid(tmp_path / "grid.yaml", out_dir=str(tmp_path / "out"), shards=str(shards),
                      test_sets=["visa", "bmad-brain"])
    first = subprocess.Popen([sys.executable, "-m", "zsadx", "grid", "run", str(grid), "--wait"], cwd=REPO,
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = tmp_path / "out" / ".grid.lock"
        _wait_for(lambda: lock.is_file() and lock.stat().st_size > 0, "the first run to take the lock")
        assert main(["grid", "run", str(grid), "--wait"]) == 2
        err = capsys.readouterr().err
        assert "in use by" in err and f"pid {first.pid}" in err and "grid run" in err, err
        # --wait-lock: blocks until the first run ends, then finds every cell done
        assert main(["grid", "run", str(grid), "--wait", "--wait-lock"]) == 0
        assert "nothing to do: all 2 cells are done" in capsys.readouterr().out
        out = first.communicate(timeout=60)[0]
    finally:
        first.kill()
    assert first.returncode == 0, out
    assert out.count("done eval/clip/zero-shot/visa/seed0") == 1       # each cell computed once


_WRITER = """
import sys
from launch import cache
folder, name = sys.argv[1], sys.argv[2]
for i in range(150):
    cache.write_marker(folder, **{name: i})
"""


def test_markers_written_by_two_processes_at_once_lose_nothing_and_leave_no_temp_file(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), name], cwd=REPO, env=subprocess_env(),
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    marker = cache.read_marker(tmp_path)
    assert marker["a"] == 149 and marker["b"] == 149, marker       # neither overwrote the other's field
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cell.lock", "cell.json"]


# ---- cases 8, 9: exit code, per-cell progress, failures with their logs -----------------------

def test_run_with_a_failed_cell_exits_1_and_prints_progress_and_the_failure(tmp_path, shards, capsys):
    broken_root = tmp_path / "shards"
    shutil.copytree(shards, broken_root)
    broken = sorted(broken_root.glob("bmad-brain-*-test-*.tar"))[0]
    broken.write_bytes(broken.read_bytes()[:300])
    grid = write_grid(tmp_path / "grid.yaml", out_dir=str(tmp_path / "out"), shards=str(broken_root),
                      test_sets=["visa", "bmad-brain"], cluster="local")
    assert main(["grid", "run", str(grid), "--wait"]) == 1
    out = capsys.readouterr().out
    assert "started eval/clip/zero-shot/visa/seed0" in out
    lines = out.splitlines()
    assert any(l.startswith("[") and "/2] done eval/clip/zero-shot/visa/seed0" in l for l in lines), out
    assert any("/2] failed eval/clip/zero-shot/bmad-brain/seed0" in l for l in lines), out
    assert "2/2 cells ended: 1 done, 1 failed" in out
    log = next(l.split("log: ")[1] for l in lines if "log: " in l)
    assert Path(log).is_file()
    assert any("error:" in l and broken.name in l for l in lines), out
    # status agrees
    assert main(["grid", "status", str(grid)]) == 1
    assert "failed    eval/clip/zero-shot/bmad-brain/seed0" in capsys.readouterr().out


# ---- case 10: names that become paths ---------------------------------------------------------

@pytest.mark.parametrize("spec, key", [
    ({"methods": [{"config": "methods/clip-tiny", "label": "../../X"}], "test_sets": ["visa"]}, "methods[0].label"),
    ({"test_sets": ["visa", "../../etc"]}, "test_sets[1]"),
    ({"protocol": {"type": "paper", "datasets": ["mvtec-ad", "/abs"]}}, "protocol.datasets[1]"),
    ({"methods": [{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny"}],
      "train_sets": [{"name": "..", "sources": [{"dataset": "visa"}]}], "test_sets": ["visa"]}, "train_sets[0].name"),
])
def test_names_that_would_leave_out_dir_are_refused_naming_the_key(tmp_path, capsys, spec, key):
    out = tmp_path / "a" / "b" / "out"
    grid = write_grid(tmp_path / "grid.yaml", out_dir=str(out), shards=str(tmp_path / "none"), **spec)
    assert main(["grid", "run", str(grid)]) == 2
    err = capsys.readouterr().err
    assert key in err and "cannot be used as a file or folder name" in err, err
    assert not out.exists() and not list(tmp_path.rglob("cell.json"))


def test_method_name_from_its_config_is_checked_and_cell_folders_stay_under_out_dir(tmp_path):
    method = tmp_path / "m.yaml"
    method.write_text(yaml.safe_dump({"_base_": str(REPO / "configs/methods/clip-tiny.yaml"), "name": "../up"}))
    grid = write_grid(tmp_path / "grid.yaml", out_dir=str(tmp_path / "out"), methods=[{"config": str(method)}],
                      test_sets=["visa"])
    from zsadx.errors import UnsafePathError

    with pytest.raises(UnsafePathError, match="method name"):
        expand(load_grid(str(grid)))
    # a symbolic link inside out_dir that leads out of it
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "eval")
    grid = write_grid(tmp_path / "grid.yaml", out_dir=str(tmp_path / "out"), test_sets=["visa"])
    with pytest.raises(UnsafePathError, match="leads outside"):
        expand(load_grid(str(grid)))


# ---- case 11: datasets the shard folder lacks -------------------------------------------------

def test_plan_and_run_name_absent_datasets_and_run_submits_only_cells_that_can_run(tmp_path, shards, capsys):
    grid = write_grid(tmp_path / "grid.yaml", out_dir=str(tmp_path / "out"), shards=str(shards),
                      test_sets=["visa", "btad", "mpdd"])
    assert main(["grid", "plan", str(grid)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {shards} has no dataset btad, mpdd" in out, out
    assert "no-data   eval/clip/zero-shot/btad/seed0" in out and "missing   eval/clip/zero-shot/visa/seed0" in out
    assert main(["grid", "run", str(grid)]) == 0
    out = capsys.readouterr().out
    assert out.index("has no dataset btad, mpdd") < out.index("started eval/clip/zero-shot/visa/seed0")
    assert "1/1 cells ended: 1 done" in out
    assert not (tmp_path / "out" / "eval" / "clip" / "zero-shot" / "btad").exists()   # never submitted
    # no shard index at all: every cell is named as unable to run, nothing is submitted
    grid = write_grid(tmp_path / "grid2.yaml", out_dir=str(tmp_path / "out2"), shards=str(tmp_path / "nowhere"),
                      test_sets=["visa"])
    assert main(["grid", "run", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "no shard index" in out and "nothing submitted" in out and "1 no data" in out, out
    assert not list((tmp_path / "out2").rglob("cell.json"))


# ---- case 12 (the demo's part): overrides of the README example -------------------------------

def test_demo_routes_backbone_and_method_overrides_to_every_method_and_seed_to_the_grid(tmp_path):
    from zsadx.demo import demo_grid, load_demo_config

    cfg = load_demo_config("demo", ["backbone.image_size=320", "seed=3", "method.shots=0", f"out_dir={tmp_path}"])
    assert cfg.seed == 3 and cfg.method_overrides == ["backbone.image_size=320", "shots=0"]
    plan = expand(demo_grid(cfg))
    cells = [*plan.train, *plan.evals]
    assert {c.config["method"]["backbone"]["image_size"] for c in cells} == {320}
    assert {c.seed for c in cells} == {3}


def test_demo_with_a_wrong_method_key_fails_in_one_line_before_making_data(tmp_path, capsys):
    assert main(["demo", f"out_dir={tmp_path / 'demo'}", "backbone.image_sise=320"]) == 2
    err = capsys.readouterr().err
    assert "image_sise" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "demo" / "shards").exists()


# ---- a training cell whose config changed starts its run over ----------------------------------

def test_a_training_cell_whose_config_changed_retrains_instead_of_failing_its_resume(tmp_path, shards, capsys):
    """The run folder of a training cell was trained at lr 1e-3; the grid now says 2e-3. Resuming
    would be refused (the trainer compares configs), reusing it would be wrong: the cell starts over."""
    def grid(lr: str) -> Path:
        return write_grid(tmp_path / "grid.yaml", out_dir=str(tmp_path / "out"), shards=str(shards),
                          methods=[{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny",
                                    "label": "ac", "train_overrides": ["max_steps=2", "data.batch_size=2",
                                                                       f"optim.lr={lr}"]}],
                          train_sets=[{"name": "visa", "sources": [{"dataset": "visa"}]}], test_sets=["bmad-brain"])

    assert main(["grid", "run", str(grid("1.0e-3")), "--wait"]) == 0
    run = tmp_path / "out" / "train" / "ac" / "visa" / "seed0" / "run"
    first = (run / "final.pt").read_bytes()
    assert main(["grid", "run", str(grid("2.0e-3")), "--wait"]) == 0, capsys.readouterr()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 2.0e-3  # the config that ran
    assert (run / "final.pt").read_bytes() != first
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2    # one run's log, not two mixed
    capsys.readouterr()
    assert main(["grid", "run", str(grid("2.0e-3")), "--wait", "--force"]) == 0  # forced: trained again
    assert "done train/ac/visa/seed0" in capsys.readouterr().out
