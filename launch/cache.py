"""Skip-done cache: every cell has a key and a marker file.

Key of a train cell = hash(resolved train config, code version, fingerprints of its datasets' shards).
Key of an eval cell = hash(resolved eval config, code version, fingerprint of the dataset's shards,
sha256 of the checkpoint it evaluates). The job writes ``<cell folder>/cell.json`` with its key and
status (submitted / running / done / failed, log path, last error line); a cell whose marker says
done with the key the plan computes now is never recomputed unless forced.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

from launch.grid import EvalCell, TrainCell, digest

MARKER = "cell.json"
_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha(path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    st = path.stat()
    k = (str(path), st.st_mtime_ns, st.st_size)
    if k not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[k] = h.hexdigest()[:16]
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


def train_key(cell: TrainCell) -> str:
    data = [dataset_fingerprint(s["shards"], s["dataset"]) for s in cell.config["data"]["sources"]]
    return digest({"config": cell.config, "code": _code(), "data": data})


def eval_key(cell: EvalCell) -> Optional[str]:
    """None while the checkpoint it needs does not exist yet."""
    ckpt = None
    if cell.config.get("checkpoint"):
        ckpt = file_sha(Path(cell.config["checkpoint"]))
        if ckpt is None:
            return None
    d = cell.config["data"]
    return digest({"config": cell.config, "code": _code(), "data": dataset_fingerprint(d["shards"], d["dataset"]),
                   "checkpoint": ckpt})


def key_of(cell) -> Optional[str]:
    return train_key(cell) if isinstance(cell, TrainCell) else eval_key(cell)


def read_marker(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, **fields) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = {**(read_marker(folder) or {}), **fields, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, folder / MARKER)
    return marker


def state(cell) -> str:
    """done | failed | running | submitted | stale (done under another key) | waiting | missing."""
    marker = read_marker(cell.folder)
    key = key_of(cell)
    if marker is None:
        return "waiting" if key is None else "missing"
    status = marker.get("status")
    if status == "done":
        return "done" if key is not None and marker.get("key") == key else ("waiting" if key is None else "stale")
    return status or "missing"
