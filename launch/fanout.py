"""Fan a plan out with submitit: training jobs first, evaluation arrays after them.

* ``slurm``: train cells are submitted (one job each on ``slurm.nodes`` nodes with ``gpus_per_node``
  GPUs; one task per node, each an ``accelerate launch``),
  then one evaluation array per training job with ``--dependency=afterany:<train job>`` (the eval job
  checks that its training succeeded and fails with that reason otherwise), plus one array for the
  evaluations that need no new training. ``run`` returns once everything is submitted (``wait``:
  it follows the cells to the end).
* ``local``: the same jobs as local processes (submitit's LocalExecutor), stage after stage; ``run``
  blocks until every cell has finished, printing a line per cell.
* ``debug``: in this process, one after the other (no submitit; for debugging a cell); blocks too.

Only missing, stale, failed or lost cells are submitted (``force`` resubmits finished ones too). A
cell whose job or process still runs is never submitted a second time, and cells whose datasets the
shard folder lacks are not submitted at all. One ``run`` at a time per grid folder (a lock).
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from launch import cache
from launch.grid import EvalCell, Plan, TrainCell, absent_data
from launch.jobs import CellBatch, CellJob
from zsadx.files import FolderLock

FINAL = ("done", "failed", "lost")
GRID_LOCK = ".grid.lock"


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


def _spec(cell, key: Optional[str], processes: int = 1, cluster: str = "debug", fresh: bool = False,
          grid: str = "") -> dict:
    spec = {"id": cell.id, "folder": str(cell.folder), "config": cell.config, "key": key, "method": cell.method,
            "train_set": cell.train_set, "seed": cell.seed, "cluster": cluster, "grid": grid,  # tracker tags
            "token": uuid.uuid4().hex}  # this submission, in the markers its job writes
    if isinstance(cell, TrainCell):
        spec.update(kind="train", processes=processes, fresh=fresh)
    else:
        spec.update(kind="eval", dataset=cell.dataset, shots=cell.shots,
                    train_folder=str(cell.train.folder) if cell.train else None)
    return spec


def _trained_under_another_key(cell: TrainCell) -> bool:
    """Whether a training cell's run folder was trained under another key (its config or the code
    changed since): such a run starts over instead of resuming. A run whose key is unknown resumes,
    and the trainer refuses a resume whose config differs from the checkpoint's."""
    m = cache.read_marker(cell.folder) or {}
    made_with = m.get("run_key") or (m.get("key") if m.get("status") == "done" else None)
    return made_with is not None and made_with != cache.train_key(cell)


@dataclass
class Todo:
    """What a run submits, and what it leaves alone and why."""
    train: list[TrainCell]
    evals: list[EvalCell]
    states: dict[str, str]                                    # every cell's state before the run
    alive: list[str] = field(default_factory=list)            # still queued or running: never twice
    unchecked: list[str] = field(default_factory=list)        # open, but where it runs cannot be checked
    after_alive: list[str] = field(default_factory=list)      # evaluations of a training still running
    no_data: list[str] = field(default_factory=list)          # their datasets are not sharded
    after_job: dict[str, str] = field(default_factory=dict)   # eval id -> SLURM job of its running training
    fresh: set[str] = field(default_factory=set)              # training cells that start their run over
    grid: str = ""                                            # the grid's name (tracker runs group by it)


def _left_alone(cell, t: Todo, force: bool, live: cache.Liveness, no_data) -> bool:
    """True (and recorded in ``t``) for a cell this run must not submit: its data is absent, or it
    is submitted/running and alive, or where it runs cannot be checked (another host, no squeue,
    a marker of an older zsadx; ``force`` resubmits those)."""
    if cell.id in no_data:
        t.no_data.append(cell.id)
        return True
    if t.states[cell.id] not in cache.OPEN:
        return False
    marker, written = cache.read_marker_timed(cell.folder)
    if live.alive(marker or {}, written) is not None:
        t.alive.append(cell.id)
        return True
    if not force:
        t.unchecked.append(cell.id)
    return not force


def todo(plan: Plan, force: bool = False, states: Optional[dict[str, str]] = None,
         no_data: frozenset[str] | set[str] = frozenset()) -> Todo:
    states = states if states is not None else cache.states([*plan.train, *plan.evals])
    t, live = Todo([], [], states, grid=plan.grid.name or Path(plan.grid.out_dir).name), cache.Liveness()
    for c in plan.train:
        if not _left_alone(c, t, force, live, no_data) and (force or states[c.id] != "done"):
            t.train.append(c)
            if force or _trained_under_another_key(c):
                t.fresh.add(c.id)
    retrain = {c.id for c in t.train}
    running = set(t.alive) | set(t.unchecked)
    for c in plan.evals:
        if _left_alone(c, t, force, live, no_data):
            continue
        if c.train is not None and c.train.id in running:  # its checkpoint is not written yet
            job = (cache.read_marker(c.train.folder) or {}).get("job_id")
            if plan.grid.cluster == "slurm" and c.train.id in t.alive and job:
                t.after_job[c.id] = str(job)  # submitted to run after that job
                t.evals.append(c)
            else:
                t.after_alive.append(c.id)
        elif force or (c.train is not None and c.train.id in retrain) or states[c.id] != "done":
            t.evals.append(c)
    return t


def _submit_array(ex, specs: list[dict]) -> list:
    if not specs:
        return []
    with ex.batch():
        jobs = [ex.submit(CellJob(s)) for s in specs]
    for s, j in zip(specs, jobs):
        cache.mark_submitted(Path(s["folder"]), s, str(j.job_id), str(j.paths.stderr))
    return jobs


def run(plan: Plan, force: bool = False, wait: bool = False, log=print, wait_lock: bool = False) -> dict:
    """Submit what the grid needs; with the grid folder's lock held (another run of the same grid
    raises LockedError naming its holder, or is waited for with ``wait_lock``). Returns
    {train, eval, jobs, skipped: {reason: [ids]}, failed: [ids] (blocking runs: failed or lost)}."""
    g = plan.grid
    with FolderLock(g.out_dir, f"grid '{g.name or g.out_dir}'", name=GRID_LOCK, wait=wait_lock):
        absent = absent_data(plan)
        for line in absent.warnings("are not submitted"):
            log(line)
        t = todo(plan, force, no_data=absent.cells)
        summary = {"train": len(t.train), "eval": len(t.evals), "jobs": [], "failed": [],
                   "skipped": {"still running": t.alive, "unchecked": t.unchecked,
                               "training still running": t.after_alive, "no data": t.no_data}}
        if t.alive:
            log(f"{len(t.alive)} cell(s) still queued or running are left alone (see `zsadx grid status`)")
        if t.unchecked:
            log(f"{len(t.unchecked)} cell(s) marked queued or running cannot be checked from here (run on another "
                f"host, no squeue, or marked by an older zsadx): left alone; --force resubmits them")
        if t.after_alive:
            log(f"{len(t.after_alive)} evaluation(s) wait for their training, still running: run again after it")
        if not t.train and not t.evals:
            return summary
        folder = Path(g.out_dir) / "submitit" / time.strftime("%Y%m%d-%H%M%S")
        progress = Progress(len(t.train) + len(t.evals), log)
        if g.cluster == "slurm":
            summary["jobs"] = _run_slurm(plan, t, folder, log)
            if wait:
                watch([c.folder for c in (*t.train, *t.evals)], progress)
        elif g.cluster == "debug":
            _run_debug(t, progress)
        else:
            summary["jobs"] = _run_local(plan, t, folder, progress)
        if g.cluster != "slurm" or wait:
            summary["failed"] = progress.report_end()
        return summary


def _run_slurm(plan: Plan, t: Todo, folder: Path, log) -> list[str]:
    g = plan.grid
    procs = max(1, g.slurm.gpus_per_node)
    tex = _executor(plan, folder, g.slurm.gpus_per_node, nodes=g.slurm.nodes)
    train_jobs = {}
    for c in t.train:
        (job,) = _submit_array(tex, [_spec(c, None, procs, "slurm", c.id in t.fresh, t.grid)])
        train_jobs[c.id] = job
    by_job: dict[Optional[str], list[dict]] = {}  # one array per training job they wait for
    for c in t.evals:
        job = str(train_jobs[c.train.id].job_id) if c.train is not None and c.train.id in train_jobs else None
        by_job.setdefault(job or t.after_job.get(c.id), []).append(_spec(c, None, cluster="slurm", grid=t.grid))
    eval_jobs = []
    for job, specs in by_job.items():
        ex = _executor(plan, folder, dependency=f"afterany:{job}" if job else None)
        eval_jobs += _submit_array(ex, specs)
    log(f"submitted {len(train_jobs)} training job(s) and {len(eval_jobs)} evaluation task(s) to SLURM "
        f"(logs under {folder})")
    return [j.job_id for j in (*train_jobs.values(), *eval_jobs)]


def _run_debug(t: Todo, progress: "Progress") -> None:
    """In this process, in order; failures stay in the markers (and are reported at the end)."""
    for spec in [_spec(c, None, 1, fresh=c.id in t.fresh, grid=t.grid) for c in t.train]:
        _run_here(spec, progress)
    for spec in [_spec(c, None, grid=t.grid) for c in _after_training(t.evals, progress)]:
        _run_here(spec, progress)


def _run_here(spec: dict, progress: "Progress") -> None:
    progress.started(spec["id"])
    try:
        CellJob(spec)()
    except Exception:  # noqa: BLE001 - recorded in the cell's marker
        pass
    progress.finished(spec["id"], Path(spec["folder"]))


def _run_local(plan: Plan, t: Todo, folder: Path, progress: "Progress") -> list[str]:
    """Stage after stage, in this call; the machine's cores are split between the jobs."""
    cores = os.cpu_count() or 1
    tspecs = [{**_spec(c, None, 1, "local", c.id in t.fresh, t.grid), "threads": max(1, cores // max(1, len(t.train)))} for c in t.train]
    jobs = _submit_array(_executor(plan, folder), tspecs)
    watch([c.folder for c in t.train], progress)
    _reap(jobs)
    evals = _after_training(t.evals, progress)
    n = max(1, min(len(evals), cores))
    specs = [{**_spec(c, None, cluster="local", grid=t.grid), "threads": max(1, cores // n)} for c in evals]
    eval_jobs = []
    if specs:
        ex = _executor(plan, folder)
        with ex.batch():
            eval_jobs = [ex.submit(CellBatch(specs[i::n])) for i in range(n)]
    for i, job in enumerate(eval_jobs):
        for s in specs[i::n]:
            cache.mark_submitted(Path(s["folder"]), s, str(job.job_id), str(job.paths.stderr))
    watch([c.folder for c in evals], progress)
    _reap(eval_jobs)
    return [j.job_id for j in (*jobs, *eval_jobs)]


def _after_training(evals: list[EvalCell], progress: "Progress") -> list[EvalCell]:
    """The evaluations whose training (if this run trained it) is done; the others are reported
    as skipped instead of started only to fail."""
    out = []
    for c in evals:
        trained = progress.ended.get(c.train.id) if c.train is not None else None
        if trained not in (None, "done"):
            progress.skipped(c.id, f"its training cell {c.train.id} is {trained}")
        else:
            out.append(c)
    return out


def _reap(jobs: list, timeout: float = 30.0) -> None:
    """Let local job processes whose cells have all ended exit (and reap them). Not ``result()``:
    for a killed job it waits for a result file that never comes; the markers hold the outcome."""
    end = time.time() + timeout
    for j in jobs:
        while not j.done() and time.time() < end:
            time.sleep(0.2)


class Progress:
    """One line per cell as it starts and ends: ``[n/N] done <id> (elapsed)``; at the end the
    failed and lost cells with their logs and errors, as ``zsadx grid status`` shows them."""

    def __init__(self, total: int, log: Callable = print):
        self.total, self.log, self.t0 = total, log, time.time()
        self.ended: dict[str, str] = {}
        self.seen: set[str] = set()

    def _elapsed(self) -> str:
        return f"{time.time() - self.t0:.0f} s"

    def started(self, cell_id: str) -> None:
        if cell_id not in self.seen:
            self.seen.add(cell_id)
            self.log(f"started {cell_id} ({self._elapsed()})")

    def finished(self, cell_id: str, folder: Path, status: Optional[str] = None) -> None:
        if cell_id in self.ended:
            return
        marker = cache.read_marker(folder) or {}
        status = status or marker.get("status") or "lost"
        self.ended[cell_id] = status
        self.seen.add(cell_id)
        self.log(f"[{len(self.ended)}/{self.total}] {status} {cell_id} ({self._elapsed()})")
        if status != "done":
            for line in failure_lines(status, marker):
                self.log(line)

    def skipped(self, cell_id: str, why: str) -> None:
        self.ended[cell_id] = "skipped"
        self.log(f"[{len(self.ended)}/{self.total}] skipped {cell_id}: {why}")

    def report_end(self) -> list[str]:
        bad = [i for i, s in self.ended.items() if s != "done"]
        counts: dict[str, int] = {}
        for s in self.ended.values():
            counts[s] = counts.get(s, 0) + 1
        self.log(f"{len(self.ended)}/{self.total} cells ended: "
                 + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" ({self._elapsed()})")
        if bad:
            self.log(f"{len(bad)} cell(s) did not finish: {', '.join(bad)}")
        return bad


def failure_lines(status: str, marker: dict) -> list[str]:
    """The log and error lines under a failed or lost cell."""
    log = marker.get("log_file") or marker.get("log")
    error = cache.lost_reason(marker) if status == "lost" else marker.get("error")
    return [f"          log: {log}", f"          error: {error}"]


def watch(folders: list[Path], progress: Progress, poll: float = 2.0) -> None:
    """Follow cells through their markers until each is done, failed or lost (its job or process
    gone); no sacct needed, clusters without accounting work."""
    pending = {str(f): Path(f) for f in folders}
    while pending:
        live = cache.Liveness()
        for key, folder in list(pending.items()):
            status, marker = cache.marker_status(folder, live)
            cell_id = (marker or {}).get("id") or key
            if status == "running":
                progress.started(cell_id)
            if status in FINAL:
                progress.finished(cell_id, folder, status)
                del pending[key]
        if pending:
            time.sleep(poll)


def follow_markers(folders: list[Path], log=print, poll: float = 3.0) -> list[str]:
    """Follow cells (e.g. SLURM jobs submitted earlier) to their end; returns the ones not done."""
    progress = Progress(len(folders), log)
    watch(folders, progress, poll)
    return progress.report_end()
