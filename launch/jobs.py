"""Job entry points: what one SLURM (or local) job runs for one cell.

``CellJob`` is a submitit checkpointable callable. A train cell runs the trainer as a child process
(``accelerate launch`` over the job's GPUs when there are several; a multi-node cell runs one such
task per node and only rank 0 writes the marker) with ``resume: latest``; on
pre-emption or time-out submitit calls ``checkpoint``, which forwards SIGTERM to the trainer (it
saves a step checkpoint and exits) and requeues the same job, which resumes from there. An eval
cell runs the evaluator in-process. Every job writes its cell marker (running, then done or failed
with the last error line), so a failing cell never stops the others and ``zsadx grid status`` can
say what went wrong.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import yaml

from launch import cache
from zsadx.files import atomic_write_text

# Exit codes of a trainer that stopped at a checkpoint because of SIGTERM / SIGUSR1 / SIGUSR2.
PREEMPTED = {128 + signal.SIGTERM, 128 + signal.SIGUSR1, 128 + signal.SIGUSR2}


def _last_error_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return line[:500]
    return lines[-1][:500] if lines else ""


def _job_env():
    """submitit's view of this SLURM job, or None outside one (debug executor, local, direct call)."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        env.paths  # noqa: B018 - raises outside a submitit job
        return env
    except Exception:  # noqa: BLE001
        return None


def _log_path() -> Optional[str]:
    env = _job_env()
    return str(env.paths.stderr) if env is not None else None


def cell_tracking(spec: dict) -> dict:
    """The cell's ``tracking`` section: its tracker run is named by the cell id, grouped by the
    grid and tagged with what the cell runs (the config's own tags are kept besides)."""
    tracking = dict(spec["config"].get("tracking") or {})
    tags = {"grid": spec.get("grid") or "", "cell": spec["id"], "method": spec["method"],
            "train_set": spec["train_set"], "seed": str(spec["seed"])}
    if spec["kind"] == "eval":
        tags.update(test_set=spec["dataset"], shots=str(spec["shots"]))
    return {**tracking, "run_name": spec["id"], "tags": {**(tracking.get("tags") or {}), **tags}}


def _task_rank() -> int:
    env = _job_env()
    return env.global_rank if env is not None and env.cluster == "slurm" else 0


def trainer_command(processes: int, args: list[str]) -> list[str]:
    """The trainer's command line for this task. A multi-node cell runs one task per node (each an
    ``accelerate launch`` over its node's GPUs); machine rank, machine count and the main address come
    from SLURM through submitit, the port from the job id (jobs sharing a node do not collide)."""
    env = _job_env()
    machines = env.num_tasks if env is not None and env.cluster == "slurm" else 1
    if machines == 1 and processes == 1:
        return [sys.executable, *args]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(processes * machines)]
    if machines > 1:
        cmd += ["--num_machines", str(machines), "--machine_rank", str(env.global_rank),
                "--main_process_ip", env.hostnames[0], "--main_process_port", str(29500 + int(env.job_id) % 1000),
                "--rdzv_backend", "static", "--same_network"]
    return cmd + args


class CellJob:
    """Run one cell: ``spec`` = {kind, id, folder, config, key, processes}."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._child: Optional[subprocess.Popen] = None
        self._requeued = False

    def __call__(self) -> dict:
        spec, folder = self.spec, Path(self.spec["folder"])
        if _task_rank() != 0:  # another node of a multi-node training cell: rank 0 keeps the marker
            return self._train(folder)
        t0 = time.time()
        env = _job_env()
        cache.write_marker(folder, id=spec["id"], status="running", key=spec.get("key"), host=os.uname().nodename,
                           log=_log_path(), error=None, cluster=spec.get("cluster") or (env.cluster if env else "debug"),
                           job_id=env.job_id if env is not None else None,
                           where=cache.process_identity(os.getpid()), trainer=None, token=spec.get("token"))
        try:
            result = self._train(folder) if spec["kind"] == "train" else self._eval(folder)
        except BaseException as exc:  # noqa: BLE001 - record every failure, then let the scheduler see it
            if self._requeued:  # submitit's SystemExit after a requeue: the cell is queued again, not failed
                raise
            cache.write_marker(folder, status="failed", error=_last_error_line(
                getattr(exc, "log_tail", "") or "".join(traceback.format_exception_only(type(exc), exc))),
                seconds=round(time.time() - t0, 2))
            raise
        cache.write_marker(folder, status="done", key=result.pop("key"), seconds=round(time.time() - t0, 2), **result)
        return result

    # -- train ------------------------------------------------------------------------------
    def _train(self, folder: Path) -> dict:
        from launch.grid import TrainCell

        spec = self.spec
        cfg_file = folder / "train.yaml"
        folder.mkdir(parents=True, exist_ok=True)  # other nodes may start before rank 0 wrote its marker
        cell = TrainCell(spec["method"], spec["train_set"], spec["seed"], spec["config"], folder)
        config = {**spec["config"], "tracking": cell_tracking(spec)}
        # A run trained under another key (or forced) starts over; a requeued job (SLURM counts its
        # restarts, the same on every node) resumes what its first start began.
        if spec.get("fresh") and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
            config.update(resume=None, overwrite=True)
        # Every node of a multi-node cell writes it: atomically, so no launcher reads half a file.
        atomic_write_text(cfg_file, yaml.safe_dump(config, sort_keys=False))
        cmd = trainer_command(int(spec.get("processes", 1)), ["-m", "zsadx.train", "--config", str(cfg_file)])
        rank = _task_rank()
        log = folder / ("train.log" if rank == 0 else f"train.node{rank}.log")
        env = dict(os.environ)
        if spec.get("threads"):  # jobs sharing a machine (local executor) split its cores
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        with open(log, "a") as f:
            self._child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            if rank == 0:  # an orphaned trainer (its job killed) keeps the cell alive: no second one
                cache.write_marker(folder, trainer=cache.process_identity(self._child.pid), log_file=str(log),
                                   run_key=cache.train_key(cell))  # what run/ is being trained under
            rc = self._child.wait()
        self._child = None
        if rc in PREEMPTED:
            # The trainer checkpointed on a pre-emption / time-out signal. submitit's own signal
            # handler (``checkpoint`` below) requeues this job; give it time to arrive.
            for _ in range(120):
                time.sleep(0.5)
        if rc != 0:
            exc = RuntimeError(f"training exited with {rc}; log: {log}")
            exc.log_tail = log.read_text()[-20000:]
            raise exc
        return {"key": cache.train_key(cell), "checkpoint": spec["config"]["out_dir"] + "/final.pt", "log_file": str(log)}

    # -- eval -------------------------------------------------------------------------------
    def _eval(self, folder: Path) -> dict:
        from launch.grid import EvalCell
        from zsadx.config import load_config
        from zsadx.eval.cli import track_results, with_tracker_overlays
        from zsadx.eval.evaluator import EvalConfig, evaluate

        spec = self.spec
        if spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))
        if spec.get("train_folder"):
            status, _ = cache.marker_status(Path(spec["train_folder"]))
            if status != "done":
                raise RuntimeError(f"its training cell {spec['train_folder']} is {status or 'missing'}")
        cfg = with_tracker_overlays(load_config(EvalConfig, data={**spec["config"], "tracking": cell_tracking(spec)}))
        result = evaluate(cfg)
        if result is not None:
            track_results(cfg, result)
        from zsadx.eval.evaluator import results_name

        cell = EvalCell(spec["method"], spec["train_set"], spec["dataset"], spec["seed"], spec["shots"],
                        spec["config"], folder)
        return {"key": cache.eval_key(cell), "result": str(folder / results_name(cfg)),
                "mean": result["mean"] if result else None, "checkpoint": cfg.checkpoint}

    # -- submitit checkpointing -------------------------------------------------------------
    def checkpoint(self, *args, **kwargs):
        import submitit

        child = self._child
        if child is not None and child.returncode is None:
            # This handler interrupts ``child.wait()`` in the main thread, which holds Popen's wait
            # lock: a second ``wait`` here would block until its timeout. Reap with waitpid instead.
            try:
                os.kill(child.pid, signal.SIGTERM)  # the trainer saves a step checkpoint and exits
                for _ in range(3000):
                    pid, _status = os.waitpid(child.pid, os.WNOHANG)
                    if pid:
                        break
                    time.sleep(0.1)
                else:
                    os.kill(child.pid, signal.SIGKILL)
            except (ProcessLookupError, ChildProcessError):
                pass  # already gone (and reaped)
        self._requeued = True
        cache.write_marker(Path(self.spec["folder"]), status="submitted", error="requeued after pre-emption")
        return submitit.helpers.DelayedSubmission(CellJob(self.spec))


class CellBatch:
    """Several cells in one process, one after the other (local executor: saves a Python + torch
    start-up per cell on small machines). Each cell writes its own marker; a failure does not stop
    the next cell, and the batch fails at the end if any cell did."""

    def __init__(self, specs: list[dict]):
        self.specs = specs

    def __call__(self) -> list[str]:
        failed = []
        for spec in self.specs:
            try:
                CellJob(spec)()
            except Exception:  # noqa: BLE001 - recorded in the cell's marker
                failed.append(spec["id"])
        if failed:
            raise RuntimeError(f"failed cells: {', '.join(failed)}")
        return [s["id"] for s in self.specs]
