"""Step-level checkpoints: trainable state only, plain types only, verified by a manifest.

Layout of a run folder::

    <out_dir>/config.yaml                 the config that ran (a resume may change only safe keys)
    <out_dir>/method.yaml                 its method section (zsadx eval --method ... --checkpoint final.pt)
    <out_dir>/run.json                    code version, world size, start time, final step
    <out_dir>/train_log.jsonl             one line per logging step (loss, lr, samples/s), one run
    <out_dir>/checkpoints/step-00000100/  trainer.pt, rng-rank<r>.pt (+ DeepSpeed's optimizer shards),
                                          manifest.json (written last)
    <out_dir>/final.pt                    trainable state + identity of the finished run (for `zsadx eval`)
    <out_dir>/trackers/                   tracker files (tracking.log_with; the default tracking.logging_dir)
    <out_dir>/trackers.json               the wandb / MLflow run ids a resume continues
    <out_dir>/tensorboard/                written by older zsadx (tensorboard: true)

``trainer.pt`` holds the method's identity and trainable state (never the frozen backbone), the
optimizer and scheduler states, the data position (epoch, batch in epoch, global step) and the
config, as tensors and plain values only: it is read back with ``weights_only=True``, as is every
``rng-rank<r>.pt`` (RNG states as tensors and numbers). A checkpoint folder is written under
``step-N.tmp`` and renamed when complete; its ``manifest.json`` (size and sha256 of every file) is
written last, so ``resume=latest`` takes the newest checkpoint whose files match it and warns
about the ones it skips (a truncated or damaged file, a half-written folder).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from zsadx.errors import DiskFullError, UserError
from zsadx.files import (atomic_write_bytes, atomic_write_json, atomic_write_text, disk_full, hash_file,
                         is_temp_name)
from zsadx.models.checkpoints import CheckpointError, safe_load, to_bytes

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step-(\d{8})$")
_STEP_TMP = re.compile(r"^step-\d{8}\.tmp$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "zsadx-checkpoint-manifest/1"
TRAINER = "trainer.pt"


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def step_of(folder: Path) -> int:
    return int(_STEP.match(folder.name).group(1))


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Step folders (renamed, so written to the end unless damaged later), oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _STEP.match(p.name)), key=step_of)


# ------------------------------------------------------------------------------------------
# Manifest: written last, verified before a resume trusts a checkpoint
# ------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hash_file(path).hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1)


def verify(folder: Path) -> Optional[str]:
    """None when every file the manifest lists is there with its size and sha256, else the reason."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by zsadx before manifests)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is not readable ({type(exc).__name__})"
    if TRAINER not in files:
        return f"{MANIFEST} lists no {TRAINER}"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want.get('size')} (truncated?)"
        if _sha256(path) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (damaged)"
    return None


class NoCheckpointError(UserError):
    """``resume=latest`` on a run whose checkpoints all fail verification."""


def find_resume(out_dir: str | os.PathLike, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: ``latest`` -> the newest that verifies (None when the run has
    none yet), or the folder given; a damaged one is skipped with a warning naming it."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        reason = verify(path) if path.is_dir() else "not a folder"
        if reason:
            raise NoCheckpointError(f"resume={resume}: not a usable checkpoint folder: {reason}")
        return path
    found = list_checkpoints(out_dir)
    skipped = []
    for folder in reversed(found):
        reason = verify(folder)
        if reason is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, reason)
        skipped.append(f"{folder.name}: {reason}")
    if skipped:
        raise NoCheckpointError(f"{checkpoint_dir(out_dir)}: no checkpoint verifies ({'; '.join(skipped)}); "
                                f"start the run over with overwrite=true")
    return None


def clean_partial(out_dir: str | os.PathLike) -> None:
    """Remove what a killed or disk-full run of ours left half-written: ``step-N.tmp`` folders and
    temp files of the run folder's own files (names zsadx gives them, nothing else)."""
    folder = checkpoint_dir(out_dir)
    if folder.is_dir():
        for p in folder.iterdir():
            if _STEP_TMP.match(p.name) and p.is_dir():
                log.warning("removing the half-written checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)
    for p in Path(out_dir).glob(".*.tmp-*"):
        if is_temp_name(p.name) and p.name[1:].split(".tmp-")[0] in RUN_FILES and p.is_file():
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# RNG states as tensors and plain values (loadable with weights_only=True)
# ------------------------------------------------------------------------------------------

def rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank{rank}.pt"


def save_rng(folder: Path, rank: int) -> None:
    save(rng_state(), rng_file(folder, rank))


def load_rng(folder: Path, rank: int, fallback: dict) -> None:
    f = rng_file(folder, rank)
    set_rng_state(safe_load(f, "RNG state") if f.is_file() else fallback)


# ------------------------------------------------------------------------------------------
# Writing a checkpoint folder
# ------------------------------------------------------------------------------------------

def temp_folder(out_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """(folder to write into, final name). Every rank derives the same names."""
    final = checkpoint_dir(out_dir) / f"step-{step:08d}"
    return final.with_name(final.name + ".tmp"), final


def begin(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # a step-N.tmp of ours, left by a kill or a full disk
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise (disk_full(exc, tmp) or exc) from exc


def commit(tmp: Path, final: Path, keep: int) -> None:
    """The manifest last, then the rename: a folder named step-N is complete."""
    write_manifest(tmp, step_of(final))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save(obj: Any, path: Path) -> Path:
    """torch.save, atomically; a full disk is a :class:`DiskFullError` naming ``path``."""
    return atomic_write_bytes(path, to_bytes(obj))


def as_disk_full(exc: BaseException, path: Path) -> Optional[DiskFullError]:
    """A full disk as torch's and DeepSpeed's writers report it (a RuntimeError without errno) too."""
    if isinstance(exc, DiskFullError):  # already names the file that did not fit
        return exc
    full = disk_full(exc, path)
    if full is None and isinstance(exc, RuntimeError) and "write" in str(exc).lower() and _nearly_full(path):
        full = disk_full(OSError(errno.ENOSPC, "no space left"), path)
    return full


def _nearly_full(path: Path) -> bool:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free < (64 << 20)
    return False


def read_trainer(folder: Path) -> dict:
    from zsadx.models.checkpoints import TRAINER_FORMAT

    state = safe_load(folder / TRAINER, "training checkpoint")
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{folder / TRAINER}: not a zsadx training checkpoint of this version "
                              f"(format {state.get('format') if isinstance(state, dict) else None!r}, "
                              f"expected {TRAINER_FORMAT})")
    return state


# ------------------------------------------------------------------------------------------
# The run folder: one run, one log
# ------------------------------------------------------------------------------------------

RUN_FILES = ("config.yaml", "method.yaml", "run.json", "train_log.jsonl", "final.pt", "trackers.json")


def holds_run(out_dir: str | os.PathLike) -> Optional[str]:
    """What shows that ``out_dir`` holds a training run already (None for a fresh folder)."""
    out = Path(out_dir)
    if (out / "final.pt").is_file():
        return "a finished run (final.pt)"
    if list_checkpoints(out):
        return "a run's checkpoints"
    log_file = out / "train_log.jsonl"
    if log_file.is_file() and log_file.stat().st_size:
        return "a run's train_log.jsonl"
    return None


def remove_run(out_dir: str | os.PathLike) -> None:
    """``overwrite=true``: delete what a training run writes in its folder, nothing else."""
    out = Path(out_dir)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoints", "tensorboard", "trackers"):  # trackers/: the default tracking.logging_dir
        shutil.rmtree(out / name, ignore_errors=True)


def trim_log(out_dir: str | os.PathLike, step: int) -> None:
    """Keep the log lines up to ``step`` (the checkpoint a run resumes from): the lines a killed run
    wrote after it are written again by the resumed run, and the log reads as one run."""
    f = Path(out_dir) / "train_log.jsonl"
    if not f.is_file():
        return
    kept = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(f, "".join(kept))


# ------------------------------------------------------------------------------------------
# Resuming with the config that ran
# ------------------------------------------------------------------------------------------

# Keys a resume may change: how long to train and what to write, not what is computed.
SAFE_ON_RESUME = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                  "tensorboard", "tracking")
# Keys about this invocation, never compared.
NOT_COMPARED = ("resume", "overwrite", "resume_allow", "out_dir")
# Keys whose old values live on in the checkpoint's state (optimizer, scheduler, weights): a new
# value could not take effect, so no switch allows changing them.
STATE_KEYS = ("method", "optim")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config mapping -> {dotted key: value}; lists of sections as ``key[i].sub``."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)) and any(isinstance(v, dict) for v in obj):
        out = {f"{prefix}.len": len(obj)}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: list(obj) if isinstance(obj, tuple) else obj}


def covers(root: str, key: str) -> bool:
    return key == root or key.startswith((root + ".", root + "["))


def config_differences(saved: dict, now: dict, allow: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between the checkpoint's config and this one, except the
    safe ones and those in ``allow``."""
    a, b = flatten(saved), flatten(now)
    missing = object()
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))
    skip = NOT_COMPARED + SAFE_ON_RESUME + tuple(allow)
    return [k.removesuffix(".len") for k in keys if not any(covers(r, k) for r in skip)]
