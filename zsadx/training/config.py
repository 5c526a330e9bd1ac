"""Typed training configuration."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from zsadx.config import ConfigError
from zsadx.models.methods.base import MethodConfig, method_field


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
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.data.sources:
            raise ConfigError("'data.sources' is empty: name at least one {shards, dataset, split} to train on")
        for i, s in enumerate(self.data.sources):
            if not s.shards or not s.dataset:
                raise ConfigError(f"'data.sources[{i}]' needs 'shards' and 'dataset'")
        if self.gradient_accumulation < 1 or self.data.batch_size < 1:
            raise ConfigError("'gradient_accumulation' and 'data.batch_size' must be >= 1")
