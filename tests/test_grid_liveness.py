"""Issue 16 case 7: a grid's status is true. Markers say where a cell runs; a cell whose job or
process was killed reads ``lost`` (not running forever), and a re-run resubmits lost cells only,
never one whose process (or orphaned trainer) still runs. Real processes, SIGKILL, real SLURM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_shards, subprocess_env
from launch import cache, fanout
from launch.grid import expand, load_grid
from test_grid import _slurm_ready
from zsadx.cli import main


def _wait_for(predicate, what: str, timeout: float = 180):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (killed, not yet reaped by its new parent) is gone too
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_open_markers_of_dead_recycled_or_orphaned_processes(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        me = cache.process_identity(sleeper.pid)
        cache.write_marker(tmp_path, status="running", cluster="local", where=me)
        assert cache.marker_status(tmp_path)[0] == "running"
        # the same pid with another start time: a recycled pid is not the cell's process
        cache.write_marker(tmp_path, where={**me, "start": str(int(me["start"]) - 1)})
        assert cache.marker_status(tmp_path)[0] == "lost"
        # a process of another host cannot be checked from here: its status is kept
        cache.write_marker(tmp_path, where={**me, "host": "not-" + socket.gethostname(), "pid": 1})
        assert cache.marker_status(tmp_path)[0] == "running"
        # the job died, the trainer it started still runs: the cell is alive
        dead = subprocess.Popen(["true"])
        dead_ident = cache.process_identity(dead.pid)
        dead.wait()
        cache.write_marker(tmp_path, where=dead_ident, trainer=me)
        assert cache.marker_status(tmp_path)[0] == "running"
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        assert cache.marker_status(tmp_path)[0] == "lost"
    finally:
        _kill(sleeper.pid)


def test_a_cell_that_cannot_be_checked_from_here_is_left_alone_unless_forced(tmp_path, shards, capsys):
    spec = {"name": "u", "out_dir": str(tmp_path / "out"), "shards": str(shards), "cluster": "debug",
            "methods": [{"config": "methods/clip-tiny", "label": "clip"}], "test_sets": ["mvtec-ad"],
            "eval_overrides": ["data.num_workers=0"]}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    (cell,) = expand(load_grid(str(grid))).evals
    other = {"host": "not-" + socket.gethostname(), "pid": 1, "start": "1", "boot": "?"}
    cache.write_marker(cell.folder, id=cell.id, status="running", cluster="local", where=other)
    assert main(["grid", "run", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "1 cell(s) marked queued or running cannot be checked from here" in out and "started" not in out, out
    assert main(["grid", "run", str(grid), "--force"]) == 0
    assert f"[1/1] done {cell.id}" in capsys.readouterr().out


def test_slurm_cell_asked_where_squeue_is_missing_keeps_its_status(tmp_path, monkeypatch):
    cache.write_marker(tmp_path, status="submitted", cluster="slurm", job_id="424242")
    old = time.time() - 60
    os.utime(tmp_path / cache.MARKER, (old, old))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cache.marker_status(tmp_path)[0] == "submitted"      # cannot tell: not called lost


def test_slurm_cells_judged_from_one_squeue_listing(tmp_path, monkeypatch):
    """Without a SLURM cluster: a stand-in squeue on PATH lists job 7 running and array task 8_1
    pending (the real-SLURM test below covers the real one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '7 RUNNING'\necho '8_1 PENDING'\necho '9 COMPLETED'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    old = time.time() - 60
    expect = {"7": "running", "8_1": "running", "9": "lost", "10": "lost"}
    for job in expect:
        cache.write_marker(tmp_path / job, status="running", cluster="slurm", job_id=job)
        os.utime(tmp_path / job / cache.MARKER, (old, old))
    live = cache.Liveness()
    assert {job: cache.marker_status(tmp_path / job, live)[0] for job in expect} == expect
    # a marker written just now may name a job submitted after the listing: not judged from it
    cache.write_marker(tmp_path / "11", status="submitted", cluster="slurm", job_id="11")
    assert cache.marker_status(tmp_path / "11", live)[0] == "submitted"


def _train_grid(tmp_path: Path, cluster: str, shards: Path) -> Path:
    spec = {"name": "live", "out_dir": str(tmp_path / "out"), "shards": str(shards), "cluster": cluster,
            "methods": [{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny", "label": "ac",
                         "train_overrides": ["max_steps=1000000", "epochs=100000", "checkpoint_every=1000000",
                                             "log_every=1"]}],
            "train_sets": [{"name": "mvtec", "sources": [{"dataset": "mvtec-ad"}]}], "test_sets": ["mvtec-ad"],
            "eval_overrides": ["data.num_workers=0"],
            "slurm": {"cpus_per_task": 1, "mem_gb": 2, "time_min": 10}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"), {"mvtec-ad": 1}, size=64)


def _training(folder: Path) -> dict:
    """The running marker once the trainer has started."""
    return _wait_for(lambda: (m := cache.read_marker(folder) or {}).get("status") == "running"
                     and m.get("trainer") and m, "the training cell to start its trainer")


def test_killed_orchestrator_orphan_trainer_is_not_started_twice_and_reads_lost_once_gone(tmp_path, shards, capsys):
    grid = _train_grid(tmp_path, "debug", shards)
    (train,) = expand(load_grid(str(grid))).train
    orchestrator = subprocess.Popen([sys.executable, "-m", "zsadx", "grid", "run", str(grid)], cwd=REPO,
                                    env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = None
    try:
        marker = _training(train.folder)
        trainer = marker["trainer"]["pid"]
        assert marker["where"]["pid"] == orchestrator.pid          # debug: the cell runs in the orchestrator
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait()
        # The trainer, orphaned, still runs: status says so and a re-run leaves the cell alone.
        assert main(["grid", "status", str(grid)]) == 0
        out = capsys.readouterr().out
        assert f"running   {train.id}" in out, out
        assert main(["grid", "run", str(grid)]) == 0
        out = capsys.readouterr().out
        assert "1 cell(s) still queued or running are left alone" in out, out
        assert "1 evaluation(s) wait for their training" in out
        assert cache.read_marker(train.folder)["trainer"]["pid"] == trainer       # no second trainer
        # Now the trainer dies too: the cell is lost (not running forever), and a re-run submits it.
        _kill(trainer)
        _wait_for(lambda: _gone(trainer), "the trainer to die")
        assert main(["grid", "status", str(grid)]) == 1
        out = capsys.readouterr().out
        assert f"lost      {train.id}  [pid {orchestrator.pid} on {socket.gethostname()}]" in out, out
        assert f"process {orchestrator.pid} on {socket.gethostname()} is gone without a result" in out
        todo = fanout.todo(expand(load_grid(str(grid))))
        assert [c.id for c in todo.train] == [train.id] and not todo.alive
    finally:
        _kill(orchestrator.pid)
        if trainer:
            _kill(trainer)


def test_local_job_killed_ends_the_run_with_the_cell_lost_and_exit_1(tmp_path, shards):
    grid = _train_grid(tmp_path, "local", shards)
    (train,) = expand(load_grid(str(grid))).train
    orchestrator = subprocess.Popen([sys.executable, "-m", "zsadx", "grid", "run", str(grid)], cwd=REPO,
                                    env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = {}
    try:
        marker = _training(train.folder)
        assert marker["where"]["pid"] != orchestrator.pid and marker["cluster"] == "local"
        for pid in (marker["where"]["pid"], marker["trainer"]["pid"]):   # the job and its trainer
            _kill(pid)
        out = orchestrator.communicate(timeout=120)[0]
    finally:
        _kill(orchestrator.pid)
        for k in ("where", "trainer"):
            if marker.get(k):
                _kill(marker[k]["pid"])
    assert orchestrator.returncode == 1, out
    assert f"[1/2] lost {train.id}" in out and "is gone without a result" in out, out
    assert f"log: {train.folder / 'train.log'}" in out
    # its evaluation is not started only to fail
    assert f"[2/2] skipped eval/ac/mvtec/mvtec-ad/seed0: its training cell {train.id} is lost" in out
    assert cache.state(train) == "lost"


def _slurm_gone(job: str) -> bool:
    return not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()


def _past_slack(folder: Path) -> None:
    """A marker younger than the queue snapshot (less a slack) may name a job submitted after the
    snapshot, so it is not judged from it: wait until the marker is older than that."""
    written = (folder / cache.MARKER).stat().st_mtime
    time.sleep(max(0.0, written + cache.Liveness.SLACK_S + 0.5 - time.time()))


@pytest.mark.slow
@pytest.mark.skipif(_slurm_ready() is not None, reason=str(_slurm_ready()))
def test_slurm_cell_whose_job_was_killed_reads_lost_and_a_live_one_is_not_resubmitted(tmp_path, shards, capsys):
    grid = _train_grid(tmp_path, "slurm", shards)
    plan = expand(load_grid(str(grid)))
    (train,) = plan.train
    assert main(["grid", "run", str(grid)]) == 0
    job = cache.read_marker(train.folder)["job_id"]
    eval_job = cache.read_marker(plan.evals[0].folder)["job_id"]
    try:
        _training(train.folder)
        assert main(["grid", "status", str(grid)]) == 0
        assert f"running   {train.id}  [job {job}]" in capsys.readouterr().out
        assert main(["grid", "run", str(grid)]) == 0                       # alive: not submitted again
        out = capsys.readouterr().out
        assert "left alone" in out and "to SLURM" not in out, out
        assert cache.read_marker(train.folder)["job_id"] == job
        # Its evaluation's job is cancelled while the training runs: it reads lost, and a re-run
        # submits it again, to run after the training job still in the queue.
        subprocess.run(["scancel", eval_job], check=True)
        _wait_for(lambda: _slurm_gone(eval_job), f"SLURM job {eval_job} to leave the queue")
        _past_slack(plan.evals[0].folder)
        assert main(["grid", "run", str(grid)]) == 0
        out = capsys.readouterr().out
        assert "submitted 0 training job(s) and 1 evaluation task(s)" in out, out
        eval_job = cache.read_marker(plan.evals[0].folder)["job_id"]
        dependency = subprocess.run(["squeue", "-h", "-j", eval_job, "-o", "%E"], capture_output=True, text=True)
        assert f"afterany:{job}" in dependency.stdout, dependency
        # SIGKILL to the job's processes (as the OOM killer or a dying node would): no chance to write a
        # marker. (scancel would SIGTERM the trainer first, and the job would record the failure itself.)
        marker = cache.read_marker(train.folder)
        for k in ("where", "trainer"):
            os.kill(marker[k]["pid"], signal.SIGKILL)
        _wait_for(lambda: _slurm_gone(job), f"SLURM job {job} to leave the queue")
        _past_slack(train.folder)
        assert main(["grid", "status", str(grid)]) == 1
        out = capsys.readouterr().out
        assert f"lost      {train.id}  [job {job}]" in out and f"SLURM job {job} left the queue" in out, out
        assert cache.read_marker(train.folder)["status"] == "running"     # the marker is as the job left it
    finally:
        subprocess.run(["scancel", job, eval_job])
