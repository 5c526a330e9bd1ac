"""Study grids: protocol expansion, skip-done cache keys, tables, and a real SLURM end-to-end run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_shards, subprocess_env
from launch import cache
from launch.grid import GridConfig, expand, load_grid, protocol_pairings
from zsadx.config import ConfigError, load_config
from zsadx.eval import tables


def grid(**over) -> GridConfig:
    data = {"name": "t", "out_dir": "/tmp/zsadx-grid-test", "shards": "/nonexistent",
            "methods": [{"config": "methods/clip-tiny"}], **over}
    return load_config(GridConfig, data=data)


def pairs(cfg) -> dict[str, tuple]:
    return {p.train_set.name: p.tests for p in protocol_pairings(cfg)}


def test_protocol_expansion():
    pool = ["mvtec-ad", "visa", "btad", "bmad-brain", "cvc-colondb", "cvc-clinicdb"]
    assert pairs(grid(protocol={"type": "paper", "datasets": pool})) == {
        "mvtec-ad": ("visa", "btad", "bmad-brain", "cvc-colondb", "cvc-clinicdb"), "visa": ("mvtec-ad",)}
    assert pairs(grid(protocol={"type": "adaclip", "datasets": pool})) == {
        "mvtec-ad+cvc-colondb": ("visa", "btad", "bmad-brain", "cvc-clinicdb"),
        "visa+cvc-clinicdb": ("mvtec-ad", "cvc-colondb")}
    lodo = pairs(grid(protocol={"type": "leave-one-domain-out", "datasets": pool}))
    assert lodo == {"mvtec-ad+visa+btad": ("bmad-brain", "cvc-colondb", "cvc-clinicdb"),
                    "bmad-brain+cvc-colondb+cvc-clinicdb": ("mvtec-ad", "visa", "btad")}
    lodo1 = pairs(grid(protocol={"type": "leave-one-dataset-out", "datasets": ["mvtec-ad", "visa", "btad"]}))
    assert lodo1 == {"visa+btad": ("mvtec-ad",), "mvtec-ad+btad": ("visa",), "mvtec-ad+visa": ("btad",)}
    explicit = grid(train_sets=[{"name": "mix", "sources": [{"dataset": "mvtec-ad"}, {"dataset": "kvasir"}]}],
                    test_sets=["visa", "isic"])
    assert pairs(explicit) == {"mix": ("visa", "isic")}
    with pytest.raises(ConfigError, match="two domains"):
        protocol_pairings(grid(protocol={"type": "leave-one-domain-out", "datasets": ["mvtec-ad", "visa"]}))


def test_cells_of_trained_and_training_free_methods_over_seeds_and_shots():
    cfg = grid(methods=[{"config": "methods/winclip-tiny", "shots": [0, 2]},
                        {"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny",
                         "train_overrides": ["max_steps=5"]}],
               protocol={"type": "paper", "datasets": ["mvtec-ad", "visa", "btad"]}, seeds=[0, 1])
    plan = expand(cfg)
    assert sorted(c.id for c in plan.train) == [f"train/anomalyclip/{ts}/seed{s}" for ts in ("mvtec-ad", "visa")
                                                 for s in (0, 1)]
    free = [c for c in plan.evals if c.method == "winclip"]
    assert len(free) == 3 * 2 * 2 and {c.train_set for c in free} == {"zero-shot"}   # datasets x seeds x shots
    trained = [c for c in plan.evals if c.method == "anomalyclip"]
    assert sorted((c.train_set, c.dataset) for c in trained if c.seed == 0) == [
        ("mvtec-ad", "btad"), ("mvtec-ad", "visa"), ("visa", "mvtec-ad")]
    c = trained[0]
    assert c.config["checkpoint"] == str(c.train.folder / "run" / "final.pt")
    assert c.train.config["max_steps"] == 5 and c.train.config["seed"] == c.seed
    assert c.train.config["data"]["sources"][0]["dataset"] == c.train_set
    with pytest.raises(ConfigError, match="sigmaa"):
        expand(grid(methods=[{"config": "methods/clip-tiny", "overrides": ["sigmaa=1"]}], test_sets=["visa"]))


def test_cache_keys_invalidate_on_config_data_and_checkpoint(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text(json.dumps({"format_version": 1, "groups": [
        {"group": "visa-a-test", "dataset": "visa", "cls": "a", "split": "test", "shards": [], "counts": {}}]}))
    base = dict(out_dir=str(tmp_path / "out"), shards=str(shards), test_sets=["visa"],
                train_sets=[{"name": "m", "sources": [{"dataset": "visa"}]}],
                methods=[{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny"}])
    plan = expand(grid(**base))
    (train,), (ev,) = plan.train, plan.evals
    assert cache.state(train) == "missing" and cache.state(ev) == "waiting"      # no checkpoint yet
    cache.write_marker(train.folder, status="done", key=cache.train_key(train))
    ckpt = Path(ev.config["checkpoint"])
    ckpt.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, ckpt)
    assert cache.state(train) == "done" and cache.state(ev) == "missing"
    cache.write_marker(ev.folder, status="done", key=cache.eval_key(ev))
    assert cache.state(ev) == "done"
    # a retrained checkpoint invalidates the evaluation
    torch.save({"w": torch.ones(2)}, ckpt)
    assert cache.state(ev) == "stale"
    cache.write_marker(ev.folder, status="done", key=cache.eval_key(ev))
    # turning a tracker on (or the bar off) changes what is logged, not what is computed: still done
    logged = expand(grid(**{**base, "methods": [{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny",
                                                  "train_overrides": ["tracking.log_with=[tensorboard]", "log_every=1"]}]},
                         eval_overrides=["tracking.log_with=[tensorboard]", "progress=false"]))
    assert cache.state(logged.train[0]) == "done" and cache.state(logged.evals[0]) == "done"
    # a changed eval config invalidates the evaluation; a changed train config the training
    assert cache.state(expand(grid(**base, eval_overrides=["data.batch_size=3"])).evals[0]) == "stale"
    changed = expand(grid(**{**base, "methods": [{"config": "methods/anomalyclip-tiny",
                                                   "train": "train/anomalyclip-tiny", "train_overrides": ["epochs=3"]}]}))
    assert cache.state(changed.train[0]) == "stale"
    # changed shards of the dataset invalidate both
    (shards / "index.json").write_text(json.dumps({"format_version": 1, "groups": [
        {"group": "visa-a-test", "dataset": "visa", "cls": "a", "split": "test", "shards": [{"n": 1}], "counts": {}}]}))
    assert cache.state(train) == "stale" and cache.state(ev) == "stale"
    # failures are reported as such
    cache.write_marker(ev.folder, status="failed", error="ShardError: boom")
    assert cache.state(ev) == "failed"


def _rec(method, dataset, domain, seed, auroc, ap=None):
    return tables.Record(method, "m", dataset, domain, seed, 0, {"image_auroc": auroc, "image_ap": ap})


def test_table_formats_with_seeds_missing_cells_and_domain_averages(tmp_path):
    recs = [_rec("A", "visa", "industrial", 0, 0.80, 0.9), _rec("A", "visa", "industrial", 1, 0.90, 0.7),
            _rec("B", "visa", "industrial", 0, 0.70, 0.95),
            _rec("A", "btad", "industrial", 0, 0.60, 0.5),                       # B missing on btad
            _rec("A", "isic", "medical", 0, 0.50, float("nan")), _rec("B", "isic", "medical", 0, 0.55, 0.6)]
    t = tables.build(recs, ["image_auroc", "image_ap"])
    assert [r for _, r in t.rows] == ["visa", "btad", "industrial average", "isic", "medical average"]
    md = tables.render(t, "md")
    assert "| industrial | visa | **85.0±7.1** / 80.0±14.1 | 70.0 / **95.0** |" in md
    assert "| industrial | btad | 60.0 / 50.0 | - / - |" in md
    assert "| industrial | industrial average | 72.5 / 65.0 | - / - |" in md      # B lacks btad: no average
    assert "| medical | isic | 50.0 / - | **55.0** / 60.0 |" in md                # NaN AP -> '-'
    csv = tables.render(t, "csv").splitlines()
    assert csv[0] == "domain,dataset,A,B" and csv[1] == "industrial,visa,85.0±7.1 / 80.0±14.1,70.0 / 95.0"
    tex = tables.render(t, "tex")
    assert "\\textbf{85.0$\\pm$7.1}" in tex or "\\textbf{85.0±7.1}" in tex
    assert "industrial average" in tex and tex.count("\\midrule") == 3
    js = json.loads(tables.render(t, "json"))
    assert js["columns"] == ["A", "B"] and js["rows"][0]["A"][0][0] == pytest.approx(0.85)
    png = tables.plot(t, tmp_path / "p.png")
    from PIL import Image

    assert Image.open(png).size[0] > 200


# ---- real SLURM -------------------------------------------------------------------------------

def _slurm_ready() -> str | None:
    if not shutil.which("sbatch"):
        return "sbatch not installed (run `bash slurm/up.sh`; `make test` does)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if proc.returncode or not proc.stdout.strip():
        return f"SLURM not running: {proc.stderr.strip() or 'no nodes'} (start it with `bash slurm/up.sh`)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_slurm_ready() is not None, reason=str(_slurm_ready()))
def test_grid_on_real_slurm_with_a_failed_cell_and_its_rerun(tmp_path):
    shards = make_shards(tmp_path / "data", {"mvtec-ad": 1, "visa": 1, "bmad-brain": 1}, size=64)
    spec = {"name": "slurm-test", "out_dir": str(tmp_path / "out"), "shards": str(shards), "cluster": "slurm",
            "methods": [{"config": "methods/clip-tiny", "label": "clip"},
                        {"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny",
                         "label": "anomalyclip", "train_overrides": ["max_steps=6", "epochs=1000"]}],
            "train_sets": [{"name": "mvtec", "sources": [{"dataset": "mvtec-ad"}]}],
            "test_sets": ["visa", "bmad-brain"], "eval_overrides": ["data.num_workers=0"],
            "slurm": {"cpus_per_task": 1, "mem_gb": 2, "time_min": 10, "array_parallelism": 2}}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    # A broken shard of one dataset: its two evaluation cells must fail, the others must not care.
    broken = sorted(shards.glob("bmad-brain-*-test-*.tar"))[0]
    backup = broken.read_bytes()
    broken.write_bytes(backup[: len(backup) // 3])

    def zsadx(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "zsadx", *args], capture_output=True, text=True,
                              env=subprocess_env(), cwd=REPO, timeout=900)
        assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    t0 = time.time()
    run = zsadx("grid", "run", str(grid_file), "--wait", check=False)
    assert run.returncode == 1, run.stdout + run.stderr                            # a failed cell: exit 1
    assert "5/5 cells ended: 3 done, 2 failed" in run.stdout, run.stdout
    status = zsadx("grid", "status", str(grid_file), check=False)
    assert status.returncode == 1, status.stdout
    lines = status.stdout.splitlines()
    failed = [l for l in lines if l.startswith("failed")]
    assert sorted(l.split()[1] for l in failed) == ["eval/anomalyclip/mvtec/bmad-brain/seed0",
                                                     "eval/clip/zero-shot/bmad-brain/seed0"]
    assert sum(l.startswith("done") for l in lines) == 3                              # 1 train + 2 evals
    errors = [l for l in lines if "error:" in l]
    assert errors and all(broken.name in l for l in errors), errors                   # names the shard
    logs = [l.split("log: ")[1] for l in lines if "log: " in l]
    assert logs and all(Path(p).is_file() for p in logs)
    first = time.time() - t0
    # Repair the shard and run again: only the two failed cells are submitted.
    broken.write_bytes(backup)
    rerun = zsadx("grid", "run", str(grid_file), "--wait")
    assert "0 training job(s) and 2 evaluation task(s)" in rerun.stdout + rerun.stderr
    assert zsadx("grid", "status", str(grid_file)).stdout.count("\ndone") + 1 >= 5
    # A finished grid submits nothing.
    t1 = time.time()
    again = zsadx("grid", "run", str(grid_file))
    assert "nothing to do: all 5 cells are done" in again.stdout
    table = zsadx("table", str(tmp_path / "out"), "--metrics", "image_auroc,pixel_auroc")
    assert "bmad-brain" in table.stdout and "anomalyclip" in table.stdout and " - " not in table.stdout
    print(f"SLURM grid: first run {first:.0f} s, rerun of the failed cells {t1 - t0 - first:.0f} s")


def _wait_for_slurm_job(job_id: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
        if not out:
            return
        time.sleep(2)
    raise AssertionError(f"SLURM job {job_id} still queued after {timeout} s")


@pytest.mark.slow
@pytest.mark.skipif(_slurm_ready() is not None, reason=str(_slurm_ready()))
def test_sbatch_templates_on_real_slurm(tmp_path):
    """slurm/train.sbatch (2 processes through accelerate launch, CPU stands in for GPUs) and
    slurm/eval_array.sbatch (one task per dataset) as a user submits them."""
    shards = make_shards(tmp_path / "data", {"mvtec-ad": 1, "visa": 1}, size=64)
    env = {**subprocess_env(), "ZSADX_SETUP": f"cd {REPO}; export PATH={Path(sys.executable).parent}:$PATH",
           "GPUS_PER_NODE": "2", "DATASETS": "mvtec-ad visa"}
    (tmp_path / "logs").mkdir()

    def sbatch(*args) -> str:
        proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--mem=3G", "--time=10", *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    train = sbatch("--nodes=1", "--cpus-per-task=2", str(REPO / "slurm/train.sbatch"), "train/anomalyclip-tiny",
                   f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]", f"out_dir={tmp_path / 'run'}",
                   "max_steps=4", "progress=false")
    _wait_for_slurm_job(train)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 4, (tmp_path / "logs").iterdir()
    evals = sbatch("--array=0-1", "--cpus-per-task=1", str(REPO / "slurm/eval_array.sbatch"),
                   "methods/anomalyclip-tiny", str(tmp_path / "run" / "final.pt"), str(shards), str(tmp_path / "eval"),
                   "data.num_workers=0")
    _wait_for_slurm_job(evals)
    names = sorted(p.name for p in (tmp_path / "eval").glob("*.json"))
    assert len(names) == 2 and all(n.startswith("anomalyclip-final-0shot-seed0-") for n in names), names
    assert {n.endswith("-mvtec-ad.json") for n in names} == {True, False} and any(n.endswith("-visa.json") for n in names)


@pytest.mark.slow
@pytest.mark.skipif(_slurm_ready() is not None, reason=str(_slurm_ready()))
def test_preempted_training_cell_is_requeued_and_resumes(tmp_path):
    """SLURM pre-emption as submitit simulates it (SIGTERM, then its USR2 warning) in the middle of a
    training cell: the trainer checkpoints, submitit requeues the job, the run resumes and finishes."""
    shards = make_shards(tmp_path / "data", {"mvtec-ad": 1}, size=64)
    spec = {"name": "preempt", "out_dir": str(tmp_path / "out"), "shards": str(shards), "cluster": "slurm",
            "methods": [{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny", "label": "ac",
                         "train_overrides": ["max_steps=150", "epochs=1000", "checkpoint_every=10", "log_every=5"]}],
            "train_sets": [{"name": "mvtec", "sources": [{"dataset": "mvtec-ad"}]}], "test_sets": ["mvtec-ad"],
            "eval_overrides": ["data.num_workers=0"], "slurm": {"cpus_per_task": 2, "mem_gb": 3, "time_min": 10}}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    plan = expand(load_grid(str(grid_file)))
    from launch import fanout

    fanout.run(plan, log=lambda *_: None)
    (train,) = plan.train
    job = cache.read_marker(train.folder)["job_id"]
    log = Path(train.config["out_dir"]) / "train_log.jsonl"
    end = time.time() + 240
    while time.time() < end and not (log.is_file() and len(log.read_text().splitlines()) >= 4):
        time.sleep(0.5)
    assert log.is_file(), "training never started"
    subprocess.check_call(["scancel", job, "--signal", "SIGTERM"])
    subprocess.check_call(["scancel", job, "--signal", "USR2"])
    # SLURM holds a requeued job for 2 minutes (BeginTime); release it early to keep the test short.
    end = time.time() + 120
    while time.time() < end:
        reason = subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True).stdout
        if "BeginTime" in reason:
            # Only once the node has finished cleaning up the first run: a job started while its
            # old credential is still being revoked is killed by SLURM ("Job credential revoked").
            if subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip() == "idle":
                # While it waits in the queue the cell reads as queued again, never as failed.
                assert cache.read_marker(train.folder)["status"] == "submitted", cache.read_marker(train.folder)
                time.sleep(2)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                break
        if (cache.read_marker(train.folder) or {}).get("status") in ("done", "failed"):
            break
        time.sleep(0.5)
    fanout.follow_markers([train.folder, *(c.folder for c in plan.evals)], log=lambda *_: None)
    marker = cache.read_marker(train.folder)
    assert marker["status"] == "done", marker
    run = json.loads((Path(train.config["out_dir"]) / "run.json").read_text())
    assert run["steps"] == 150
    text = (train.folder / "train.log").read_text()
    assert "resumed from" in text, text[-2000:]
    assert cache.state(plan.evals[0]) == "done"


def test_multi_node_training_cells_request_nodes_and_gpus(tmp_path):
    """The grid's slurm.nodes / gpus_per_node reach the training job's sbatch script; evaluations
    stay on one node."""
    from launch import fanout

    spec = {"name": "mn", "out_dir": str(tmp_path / "out"), "cluster": "slurm",
            "methods": [{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny"}],
            "train_sets": [{"name": "mvtec", "sources": [{"dataset": "mvtec-ad"}]}], "test_sets": ["visa"],
            "slurm": {"nodes": 2, "gpus_per_node": 4, "partition": "gpu", "setup": ["module load cuda"]}}
    plan = expand(load_config(GridConfig, data=spec))
    train = fanout._executor(plan, tmp_path, gpus=4, nodes=plan.grid.slurm.nodes)._executor
    text = train._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "module load cuda", "--kill-on-bad-exit=1"):
        assert line in text, text
    evals = fanout._executor(plan, tmp_path, dependency="afterany:1")._executor
    text = evals._make_submission_file_text("python -m x", "uid")
    assert "#SBATCH --nodes=1" in text and "#SBATCH --dependency=afterany:1" in text, text
    with pytest.raises(ConfigError, match="slurm.nodes"):
        load_config(GridConfig, data={**spec, "slurm": {"nodes": 0}})


@pytest.mark.slow
@pytest.mark.skipif(_slurm_ready() is not None, reason=str(_slurm_ready()))
def test_training_cell_over_two_slurm_tasks_is_one_distributed_run(tmp_path):
    """A multi-node training cell: one task per node, each an `accelerate launch` that takes its
    machine rank and main address from SLURM. This machine has one node, so two tasks on it stand
    in for two nodes (the launch code cannot tell the difference)."""
    import submitit

    from launch import fanout
    from launch.jobs import CellJob

    shards = make_shards(tmp_path / "data", {"mvtec-ad": 1}, size=64)
    spec = {"name": "mn", "out_dir": str(tmp_path / "out"), "shards": str(shards), "cluster": "slurm",
            "methods": [{"config": "methods/anomalyclip-tiny", "train": "train/anomalyclip-tiny",
                         "train_overrides": ["max_steps=4"]}],
            "train_sets": [{"name": "mvtec", "sources": [{"dataset": "mvtec-ad"}]}], "test_sets": ["mvtec-ad"]}
    plan = expand(load_config(GridConfig, data=spec))
    (cell,) = plan.train
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="slurm")
    ex.update_parameters(nodes=1, tasks_per_node=2, cpus_per_task=1, mem_gb=4, timeout_min=10,
                         slurm_srun_args=["--kill-on-bad-exit=1"])
    job = ex.submit(CellJob(fanout._spec(cell, None, processes=1)))
    results = job.results()  # one per task; raises with the task's traceback if one failed
    assert len(results) == 2
    marker = cache.read_marker(cell.folder)
    assert marker["status"] == "done", marker
    run = json.loads((Path(cell.config["out_dir"]) / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 4, run
    # processes=1 per task: a world of 2 means both tasks' launchers joined one run
    assert (cell.folder / "train.node1.log").is_file()
