"""Skip-done cache: every cell has a key and a marker file.

Key of a train cell = hash(resolved train config, code version, fingerprints of its datasets' shards).
Key of an eval cell = hash(resolved eval config, code version, fingerprint of the dataset's shards,
sha256 of the checkpoint it evaluates: the train cell's final.pt, or the file the grid gives, so a
replaced checkpoint file makes exactly the cells that evaluate it stale). The job writes ``<cell folder>/cell.json`` with its key and
status (submitted / running / done / failed, log path, last error line); a cell whose marker says
done with the key the plan computes now is never recomputed unless forced.

A submitted or running marker also says where the cell runs: its SLURM job id, or the host, pid and
process start time of the local process (and of the trainer it started), so that a cell whose job
or process is gone reads as ``lost`` instead of running forever (see :class:`Liveness`).
"""
from __future__ import annotations

import functools
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from launch.grid import EvalCell, TrainCell, digest
from zsadx.files import FolderLock, atomic_write_json, hash_file

MARKER = "cell.json"
MARKER_LOCK = ".cell.lock"
OPEN = ("submitted", "running")  # states a live job or process stands behind
_sha_cache: dict[tuple[str, int, int, int, int], str] = {}


def file_sha(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    st = path.stat()
    # Inode and ctime too: other weights copied over a checkpoint with its size and mtime kept
    # (`rsync -a`, `cp -p`) are hashed again; ctime cannot be set back.
    k = (str(path), st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)
    if k not in _sha_cache:
        _sha_cache[k] = hash_file(path).hexdigest()[:16]
    return _sha_cache[k]


@functools.lru_cache(maxsize=64)
def _index(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text())


def dataset_fingerprint(shards: str, dataset: str) -> str:
    """What the shard index says about one dataset (shard names, counts, bytes, format)."""
    index = Path(shards) / "index.json"
    if not index.is_file():
        return "missing"
    data = _index(str(index), index.stat().st_mtime_ns)
    groups = sorted((g for g in data.get("groups", []) if g["dataset"] == dataset), key=lambda g: g["group"])
    return digest({"format": data.get("format_version"), "size": data.get("image_size"), "groups": groups})


@functools.lru_cache(maxsize=1)
def _code() -> str:  # one git call per process, not two per cell
    from zsadx.version import code_version

    return code_version()


# Config keys that only say what is shown or logged, never what is computed: turning a tracker on
# for a finished grid must not re-run its cells.
NOT_RESULT_KEYS = ("tracking", "progress", "tensorboard", "log_every")


def result_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_RESULT_KEYS}


def train_key(cell: TrainCell) -> str:
    data = [dataset_fingerprint(s["shards"], s["dataset"]) for s in cell.config["data"]["sources"]]
    return digest({"config": result_config(cell.config), "code": _code(), "data": data})


def eval_key(cell: EvalCell) -> Optional[str]:
    """None while the checkpoint it needs does not exist yet."""
    ckpt = None
    if cell.config.get("checkpoint"):
        ckpt = file_sha(Path(cell.config["checkpoint"]))
        if ckpt is None:
            return None
    d = cell.config["data"]
    return digest({"config": result_config(cell.config), "code": _code(),
                   "data": dataset_fingerprint(d["shards"], d["dataset"]),
                   "checkpoint": ckpt})


def key_of(cell) -> Optional[str]:
    return train_key(cell) if isinstance(cell, TrainCell) else eval_key(cell)


# ------------------------------------------------------------------------------------------
# Markers
# ------------------------------------------------------------------------------------------

def read_marker(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, **fields) -> dict:
    """Merge ``fields`` into the marker. The read-modify-write holds the cell's lock: the job and
    the orchestrator (or two nodes) update one marker at the same moment without losing a field."""
    folder = Path(folder)
    with FolderLock(folder, "cell marker", name=MARKER_LOCK, wait=True):
        marker = {**(read_marker(folder) or {}), **fields, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(folder / MARKER, marker, indent=2)
    return marker


def mark_submitted(folder: Path, spec: dict, job_id: str, log: Optional[str]) -> None:
    """The orchestrator's 'submitted' marker, unless this submission's job already got further (a
    local job can start and write 'running' before ``submit`` returns here)."""
    folder, cluster = Path(folder), spec["cluster"]
    with FolderLock(folder, "cell marker", name=MARKER_LOCK, wait=True):
        old = read_marker(folder) or {}
        if spec.get("token") and old.get("token") == spec["token"]:
            return
        marker = {**old, "id": spec["id"], "status": "submitted", "cluster": cluster, "job_id": job_id, "log": log,
                  "error": None, "where": None, "trainer": None, "token": spec.get("token"),
                  "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
        if cluster != "slurm":  # a local job id is the pid of submitit's controller process
            marker["where"] = process_identity(int(job_id))
        atomic_write_json(folder / MARKER, marker, indent=2)


# ------------------------------------------------------------------------------------------
# Where a cell runs, and whether it still does
# ------------------------------------------------------------------------------------------

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


def _start_ticks(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot), or None when there is no such process
    (or only its zombie: it ended, and its parent did not reap it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name before ')' may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]  # state, start time (fields 3 and 22)


def process_identity(pid: int) -> Optional[dict]:
    """host + pid + start time (+ boot): a recycled pid or a rebooted host is not mistaken for it."""
    start = _start_ticks(pid)
    if start is None:
        return None
    return {"host": socket.gethostname(), "pid": pid, "start": start, "boot": _boot_id()}


def process_alive(ident: Optional[dict]) -> Optional[bool]:
    """True / False for a process of this host; None when it ran on another host (cannot tell)."""
    if not ident:
        return False
    if ident.get("host") != socket.gethostname():
        return None
    return ident.get("boot") == _boot_id() and _start_ticks(int(ident["pid"])) == ident.get("start")


# SLURM states of a job that is still queued or running (a requeued job is pending again).
_SLURM_ALIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED"}


class Liveness:
    """Is the job or process behind an open marker still there? One ``squeue`` per instance
    (make one per pass over the cells), ``/proc`` for local processes on this host."""

    SLACK_S = 5.0  # a marker this much younger than the queue snapshot may name a job it cannot show

    def __init__(self):
        self._queue: Optional[dict[str, str]] = None
        self.taken: Optional[float] = None

    def slurm_queue(self) -> Optional[dict[str, str]]:
        """{job id: state} of every queued job (array tasks one per line), None without SLURM."""
        if self._queue is None:
            if not shutil.which("squeue"):
                return None
            taken = time.time()
            proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True)
            if proc.returncode != 0:
                return None
            self._queue = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())
            self.taken = taken
        return self._queue

    def alive(self, marker: dict, written: float = 0.0) -> Optional[bool]:
        """True / False; None when this machine cannot tell (no squeue, another host, old marker, a
        marker ``written`` after the queue snapshot)."""
        if marker.get("cluster") == "slurm":
            queue = self.slurm_queue()
            if queue is None or not marker.get("job_id"):
                return None
            state = queue.get(str(marker["job_id"]))
            if state is None and written > self.taken - self.SLACK_S:
                return None  # submitted after the snapshot, or it just ended and its marker is being written
            return state is not None and state.strip() in _SLURM_ALIVE
        if "where" not in marker:  # written before markers said where a cell runs
            return None
        answers = [process_alive(marker.get(k)) for k in ("where", "trainer") if marker.get(k)]
        if any(answers):
            return True  # the job, or the trainer it started (an orphan still writes the run folder)
        return None if None in answers else False


def lost_reason(marker: dict) -> str:
    if marker.get("cluster") == "slurm":
        return f"SLURM job {marker.get('job_id')} left the queue without a result"
    where = marker.get("where") or {}
    return f"process {where.get('pid', '?')} on {where.get('host', '?')} is gone without a result"


def read_marker_timed(folder: Path) -> tuple[Optional[dict], float]:
    """The marker and when it was written (its mtime), for :meth:`Liveness.alive`."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text()), path.stat().st_mtime
    except (OSError, ValueError):
        return None, 0.0


def marker_status(folder: Path, live: Optional[Liveness] = None) -> tuple[Optional[str], Optional[dict]]:
    """The marker's status, ``lost`` where the job or process behind an open one is gone."""
    marker, written = read_marker_timed(folder)
    if marker is None:
        return None, None
    status = marker.get("status")
    if status in OPEN and (live or Liveness()).alive(marker, written) is False:
        if read_marker(folder) == marker:  # not finished while we looked
            return "lost", marker
        return marker_status(folder, live)
    return status, marker


def state(cell, live: Optional[Liveness] = None) -> str:
    """done | failed | running | submitted | lost (its job or process is gone) | stale (done under
    another key) | waiting | missing."""
    status, marker = marker_status(cell.folder, live)
    key = key_of(cell)
    if marker is None:
        return "waiting" if key is None else "missing"
    if status == "done":
        return "done" if key is not None and marker.get("key") == key else ("waiting" if key is None else "stale")
    return status or "missing"


def states(cells) -> dict[str, str]:
    """Every cell's state, with one look at the SLURM queue."""
    live = Liveness()
    return {c.id: state(c, live) for c in cells}
