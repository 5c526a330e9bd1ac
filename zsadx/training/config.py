"""Typed training configuration."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from zsadx.config import ConfigError, suggest
from zsadx.models.methods.base import MethodConfig, method_field
from zsadx.tracking import TrackerConfig, check_installed


@dataclass
class SourceConfig:
    """One part of the auxiliary training data, e.g. MVTec AD's test split (as the papers train)."""

    shards: str = ""
    dataset: str = ""
    split: str = "test"
    classes: Optional[list[str]] = None
    weight: float = 1.0


@dataclass
class TrainDataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 8               # per process (micro-batch)
    batches_per_epoch: Optional[int] = None  # default: one pass over the sources' samples, split by rank
    num_workers: int = 2
    shuffle_buffer: int = 256
    max_skips: int = 100              # corrupt samples tolerated before training stops
    mask_resize: Literal["bilinear", "nearest"] = "bilinear"


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    # Learning rate per parameter group a method declares (ACD-CLIP: image / text); others use lr.
    group_lr: dict[str, float] = field(default_factory=dict)
    scheduler: Literal["none", "exponential"] = "none"
    gamma: float = 1.0                # exponential decay per epoch
    grad_clip: Optional[float] = None


@dataclass
class TrainConfig:
    method: MethodConfig = method_field()
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 15
    max_steps: Optional[int] = None   # stop after this many optimizer steps (tests, smoke runs)
    gradient_accumulation: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 111
    out_dir: str = "runs/train"
    checkpoint_every: int = 0         # optimizer steps between checkpoints; 0 = at every epoch end
    keep_checkpoints: int = 3
    resume: Optional[str] = None      # "latest" or a checkpoint folder
    # A folder that holds a run is refused without resume; overwrite=true deletes that run first.
    overwrite: bool = False
    # Dotted keys a resume may change besides the safe ones (max_steps, epochs, checkpoint_every,
    # keep_checkpoints, log_every, progress, tensorboard, tracking); never method.* or optim.* (their old values
    # live on in the checkpoint's state).
    resume_allow: list[str] = field(default_factory=list)
    log_every: int = 10
    tensorboard: bool = False         # deprecated: tracking.log_with=[tensorboard] (an alias of it)
    progress: bool = True
    tracking: TrackerConfig = field(default_factory=TrackerConfig)

    def validate(self) -> None:
        if not self.data.sources:
            raise ConfigError("'data.sources' is empty: name at least one {shards, dataset, split} to train on")
        for i, s in enumerate(self.data.sources):
            if not s.shards or not s.dataset:
                raise ConfigError(f"'data.sources[{i}]' needs 'shards' and 'dataset'")
            if not math.isfinite(s.weight) or s.weight <= 0:
                raise ConfigError(f"'data.sources[{i}].weight': {s.weight}; use a positive number")
        for key in ("data.batch_size", "gradient_accumulation", "epochs", "log_every"):
            value = self._get(key)
            if value < 1:
                raise ConfigError(f"'{key}': {value}; use 1 or more")
        for key in ("data.num_workers", "data.max_skips", "checkpoint_every", "keep_checkpoints"):
            value = self._get(key)
            if value < 0:
                raise ConfigError(f"'{key}': {value}; use 0 or more")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"'max_steps': {self.max_steps}; use 1 or more (or null: all epochs)")
        if self.data.batches_per_epoch is not None and self.data.batches_per_epoch < 1:
            raise ConfigError(f"'data.batches_per_epoch': {self.data.batches_per_epoch}; use 1 or more (or null)")
        lrs = {"optim.lr": self.optim.lr, **{f"optim.group_lr.{k}": v for k, v in self.optim.group_lr.items()}}
        for key, lr in lrs.items():
            if not math.isfinite(lr) or lr <= 0:
                raise ConfigError(f"'{key}': {lr}; use a positive learning rate")
        if self.overwrite and self.resume:
            raise ConfigError(f"'overwrite': true with 'resume': {self.resume}: give one or the other")
        self._validate_resume_allow()
        if self.tensorboard:
            check_installed("tensorboard", "tensorboard")

    def trackers(self) -> TrackerConfig:
        """``tracking``, with the deprecated ``tensorboard: true`` as one more tracker."""
        if not self.tensorboard or "tensorboard" in self.tracking.log_with:
            return self.tracking
        return dataclasses.replace(self.tracking, log_with=[*self.tracking.log_with, "tensorboard"])

    def _get(self, dotted: str):
        obj = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    def _validate_resume_allow(self) -> None:
        for i, key in enumerate(self.resume_allow):
            root = key.split(".")[0].split("[")[0]
            if root in ("method", "optim"):
                raise ConfigError(f"'resume_allow[{i}]': {key} cannot change in a resumed run (its old value lives "
                                  f"on in the checkpoint's optimizer state or weights); start a new run instead")
            names = [f.name for f in dataclasses.fields(self)]
            if root not in names:
                raise ConfigError(f"'resume_allow[{i}]': no key '{key}' in TrainConfig" + suggest(root, names))
