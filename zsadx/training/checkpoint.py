"""Step-level checkpoints: trainable state only, written atomically, found again by ``latest``.

Layout of a run folder::

    <out_dir>/config.yaml                 resolved config
    <out_dir>/method.yaml                 its method section (zsadx eval --method ... --checkpoint final.pt)
    <out_dir>/run.json                    code version, world size, start time, final step
    <out_dir>/train_log.jsonl             one line per logging step (loss, lr, samples/s)
    <out_dir>/checkpoints/step-00000100/  trainer.pt (+ DeepSpeed's sharded optimizer files)
    <out_dir>/final.pt                    trainable state of the finished run (for `zsadx eval`)
    <out_dir>/tensorboard/                optional

``trainer.pt`` holds the method's trainable state (never the frozen backbone), the optimizer and
scheduler states, RNG states and the data position (epoch, batch in epoch, global step). A
checkpoint folder is written under a temporary name and renamed when complete, so a run killed
while writing leaves no half checkpoint behind.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_STEP = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP.match(p.name) and (p / "trainer.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def find_resume(out_dir: str | os.PathLike, resume: Optional[str]) -> Optional[Path]:
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"not a checkpoint folder (no trainer.pt): {path}")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def begin(out_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """(temporary folder to write into, final folder name)."""
    final = checkpoint_dir(out_dir) / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, final


def commit(tmp: Path, final: Path, keep: int) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
