"""Fan a plan out with submitit: training jobs first, evaluation arrays after them.

* ``slurm``: train cells are submitted (one job each on ``slurm.nodes`` nodes with ``gpus_per_node``
  GPUs; one task per node, each an ``accelerate launch``),
  then one evaluation array per training job with ``--dependency=afterany:<train job>`` (the eval job
  checks that its training succeeded and fails with that reason otherwise), plus one array for the
  evaluations that need no new training. ``run`` returns once everything is submitted.
* ``local``: the same jobs as local processes (submitit's LocalExecutor), stage after stage.
* ``debug``: in this process, one after the other (no submitit; for debugging a cell).

Only missing, stale or failed cells are submitted (``force`` resubmits everything).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from launch import cache
from launch.grid import EvalCell, Plan, TrainCell
from launch.jobs import CellBatch, CellJob


def _executor(plan: Plan, folder: Path, gpus: int = 0, dependency: Optional[str] = None, nodes: int = 1):
    import submitit

    g = plan.grid
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=g.cluster)
    s = g.slurm
    # One task per node: a training task runs `accelerate launch`, which starts a process per GPU.
    params = {"timeout_min": s.time_min, "cpus_per_task": s.cpus_per_task, "nodes": nodes, "tasks_per_node": 1,
              "name": f"zsadx-{g.name or 'grid'}"}
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if g.cluster == "slurm":
        params.update(slurm_array_parallelism=s.array_parallelism)
        if gpus:
            params["gpus_per_node"] = gpus
        if nodes > 1:  # a node that fails ends the job, instead of the others waiting for it until the time-out
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        for k in ("partition", "account", "qos"):
            if getattr(s, k):
                params[f"slurm_{k}"] = getattr(s, k)
        if s.setup:
            params["slurm_setup"] = list(s.setup)
        extra = dict(s.additional)
        if dependency:
            extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
        if extra:
            params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def _spec(cell, key: Optional[str], processes: int = 1) -> dict:
    spec = {"id": cell.id, "folder": str(cell.folder), "config": cell.config, "key": key, "method": cell.method,
            "train_set": cell.train_set, "seed": cell.seed}
    if isinstance(cell, TrainCell):
        spec.update(kind="train", processes=processes)
    else:
        spec.update(kind="eval", dataset=cell.dataset, shots=cell.shots,
                    train_folder=str(cell.train.folder) if cell.train else None)
    return spec


def todo(plan: Plan, force: bool = False) -> tuple[list[TrainCell], list[EvalCell]]:
    trains = [c for c in plan.train if force or cache.state(c) != "done"]
    retrain = {c.id for c in trains}
    evals = [c for c in plan.evals if force or (c.train is not None and c.train.id in retrain)
             or cache.state(c) != "done"]
    return trains, evals


def _submit_array(ex, specs: list[dict]) -> list:
    if not specs:
        return []
    with ex.batch():
        jobs = [ex.submit(CellJob(s)) for s in specs]
    for s, j in zip(specs, jobs):
        cache.write_marker(Path(s["folder"]), id=s["id"], status="submitted", job_id=j.job_id,
                           log=str(j.paths.stderr), error=None)
    return jobs


def run(plan: Plan, force: bool = False, wait: bool = False, log=print) -> dict:
    g = plan.grid
    trains, evals = todo(plan, force)
    summary = {"train": len(trains), "eval": len(evals), "jobs": []}
    if not trains and not evals:
        return summary
    folder = Path(g.out_dir) / "submitit" / time.strftime("%Y%m%d-%H%M%S")
    gpus = g.slurm.gpus_per_node if g.cluster == "slurm" else 0
    procs = max(1, gpus)
    train_jobs = {}
    tex = _executor(plan, folder, gpus, nodes=g.slurm.nodes if g.cluster == "slurm" else 1)
    if g.cluster == "slurm":
        for c in trains:
            (job,) = _submit_array(tex, [_spec(c, None, procs)])
            train_jobs[c.id] = job
        by_train: dict[Optional[str], list[dict]] = {}
        for c in evals:
            dep = c.train.id if c.train is not None and c.train.id in train_jobs else None
            by_train.setdefault(dep, []).append(_spec(c, None))
        eval_jobs = []
        for dep, specs in by_train.items():
            ex = _executor(plan, folder, dependency=f"afterany:{train_jobs[dep].job_id}" if dep else None)
            eval_jobs += _submit_array(ex, specs)
        summary["jobs"] = [j.job_id for j in (*train_jobs.values(), *eval_jobs)]
        log(f"submitted {len(train_jobs)} training job(s) and {len(eval_jobs)} evaluation task(s) to SLURM "
            f"(logs under {folder})")
        if wait:
            follow_markers([Path(c.folder) for c in (*trains, *evals)], log)
        return summary
    if g.cluster == "debug":  # in this process, in order; failures stay in the markers
        for spec in [_spec(c, None, 1) for c in trains] + [_spec(c, None) for c in evals]:
            try:
                CellJob(spec)()
            except Exception as exc:  # noqa: BLE001
                log(f"{spec['id']} failed: {exc}")
        return summary
    # local: stage after stage, in this call; the machine's cores are split between the jobs
    cores = os.cpu_count() or 1
    tspecs = [{**_spec(c, None, 1), "threads": max(1, cores // max(1, len(trains)))} for c in trains]
    jobs = _submit_array(tex, tspecs)
    follow(jobs, log, label="training")
    n = max(1, min(len(evals), cores))
    specs = [{**_spec(c, None), "threads": max(1, cores // n)} for c in evals]
    ex = _executor(plan, folder)
    with ex.batch():
        eval_jobs = [ex.submit(CellBatch(specs[i::n])) for i in range(n)] if specs else []
    follow(eval_jobs, log, label="evaluation batches")
    summary["jobs"] = [j.job_id for j in (*jobs, *eval_jobs)]
    return summary


def follow(jobs: list, log=print, label: str = "jobs", poll: float = 2.0) -> None:
    """Wait for ``jobs``, printing progress; failures are recorded in the markers, never raised."""
    if not jobs:
        return
    t0 = time.time()
    pending = list(jobs)
    last = None
    while pending:
        still = []
        for j in pending:
            if j.done():
                try:
                    j.result()
                except Exception:  # noqa: BLE001 - the cell marker holds the error
                    pass
            else:
                still.append(j)
        pending = still
        line = f"{label}: {len(jobs) - len(pending)}/{len(jobs)} finished ({time.time() - t0:.0f} s)"
        if line != last and (not pending or int(time.time() - t0) % 10 == 0):
            log(line)
            last = line
        if pending:
            time.sleep(poll)


def follow_markers(folders: list[Path], log=print, poll: float = 3.0) -> None:
    """Follow SLURM cells through their markers (no sacct needed: clusters without accounting work);
    a cell whose job left the queue without a final marker is marked failed ('lost')."""
    import subprocess

    t0, last = time.time(), None
    while True:
        markers = [cache.read_marker(f) or {} for f in folders]
        open_ = [(f, m) for f, m in zip(folders, markers) if m.get("status") not in ("done", "failed")]
        if open_:
            queued = set(subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split())
            for f, m in open_:
                job = str(m.get("job_id", ""))
                if job and job not in queued:
                    time.sleep(1.0)  # the job may be writing its marker right now
                    if (cache.read_marker(f) or {}).get("status") not in ("done", "failed"):
                        cache.write_marker(f, status="failed", error=f"job {job} left the queue without a result")
        done = sum(m.get("status") == "done" for m in markers)
        failed = sum(m.get("status") == "failed" for m in markers)
        line = f"cells: {done} done, {failed} failed, {len(folders) - done - failed} queued or running"
        if line != last:
            log(f"{line} ({time.time() - t0:.0f} s)")
            last = line
        if not open_:
            return
        time.sleep(poll)
