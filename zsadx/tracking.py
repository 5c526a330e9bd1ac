"""Experiment trackers (TensorBoard, wandb, MLflow, ...) through Accelerate's tracker API.

Training logs loss parts, learning rate and samples/s; evaluation logs per-class and mean
metrics and a few overlays. Offline-first: wandb runs in offline mode unless told otherwise, and
TensorBoard writes event files, so a cluster without internet still keeps every curve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrackerConfig:
    log_with: list[str] = field(default_factory=list)   # tensorboard | wandb | mlflow | ... (Accelerate names)
    project: str = "zsadx"
    run_name: Optional[str] = None                       # default: the run / results folder name
    tags: dict[str, str] = field(default_factory=dict)   # grid cells add grid, cell key, method, datasets
    logging_dir: Optional[str] = None                    # default: <out_dir>/trackers
