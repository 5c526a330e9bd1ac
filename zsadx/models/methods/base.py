"""The ``Method`` interface shared by the evaluator and (for trained methods) the trainer."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import nn

from zsadx.config import ConfigError, suggest
from zsadx.models.backbone import BackboneConfig, ClipBackbone, check_patch_multiple
from zsadx.models.prompt_learning import TextCache


@dataclass
class MethodConfig:
    """Keys every method has; each method's config subclasses this."""

    name: str = ""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # Post-processing the evaluator applies to the maps a method returns at patch resolution:
    # bilinear upsampling to the image size, then a Gaussian of ``sigma`` px (0: none).
    sigma: float = 4.0
    align_corners: bool = False
    # Sizes: the loader resizes images to ``input_size`` and metrics are computed at ``eval_size``
    # (both default to backbone.image_size). FADE reads 896 px and evaluates at 448.
    input_size: Optional[int] = None
    eval_size: Optional[int] = None
    # Normal reference images per class from the train split (few-shot); 0 = zero-shot.
    shots: int = 0
    # Reproduce the official code's numbers: every key of ``PAPER_COMPAT`` still at its default
    # takes the official value (each quirk stays its own key, so one can be set alone).
    paper_compat: bool = False

    # key -> the official code's value, per method config class (see each method's docstring).
    PAPER_COMPAT: ClassVar[dict[str, Any]] = {}

    def apply_paper_compat(self) -> None:
        """With ``paper_compat``, set each quirk left at its default to the official value."""
        if not self.paper_compat:
            return
        defaults = {f.name: f for f in dataclasses.fields(self)}
        for key, official in self.PAPER_COMPAT.items():
            f = defaults[key]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if getattr(self, key) == default:
                setattr(self, key, official)

    def validate(self) -> None:
        # Values the dataclass types accept but that would fail (or silently mean nothing) later.
        if not math.isfinite(self.sigma) or self.sigma < 0:
            raise ConfigError(f"'method.sigma': {self.sigma} px; use 0 (no smoothing) or a positive number")
        if self.shots < 0:
            raise ConfigError(f"'method.shots': {self.shots}; use 0 (zero-shot) or a number of normal references")
        for key in ("input_size", "eval_size"):
            size = getattr(self, key)
            if size is not None and size <= 0:
                raise ConfigError(f"'method.{key}' must be positive (or null: backbone.image_size), got {size}")
        if self.input_size is not None:
            check_patch_multiple(self.backbone.name, self.input_size, "method.input_size")


@dataclass
class Prediction:
    """``maps`` (B, h, w) at any resolution (upsampled and smoothed by the evaluator unless
    ``final``), higher = more anomalous; ``scores`` (B,) image-level anomaly scores."""

    maps: torch.Tensor
    scores: torch.Tensor
    final: bool = False


class Method(nn.Module):
    """A CLIP-based anomaly detector on a frozen backbone.

    Subclasses set ``config_cls`` and ``summary``, build their pieces in ``__init__`` and implement
    ``predict``. Trained methods also implement ``loss`` and keep every learnable tensor in
    submodules other than ``self.backbone`` -- only those are optimised and saved.
    """

    config_cls: ClassVar[type] = MethodConfig
    summary: ClassVar[str] = ""
    trained: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig, backbone: Optional[ClipBackbone] = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else ClipBackbone(cfg.backbone)
        self.text_cache = TextCache()

    def cached_text(self, key: Any, compute, depends_on: Optional[Sequence[nn.Module]] = None) -> Any:
        """``compute()`` (text features), reused across evaluation calls while the parameters of
        ``depends_on`` (default: every submodule but the frozen backbone) are unchanged (see
        :class:`TextCache`); always fresh in training or with gradients."""
        # Not named_parameters(): walking the backbone's hundreds of tensors on every call would
        # cost more than a tiny model's text encoding.
        modules = depends_on if depends_on is not None else [c for c in self.children() if c is not self.backbone]
        own = [p for m in modules for p in m.parameters()]
        return self.text_cache.get(key, compute, own, training=self.training)

    def train(self, mode: bool = True):
        self.text_cache.clear()
        return super().train(mode)

    # -- data-dependent set-up ------------------------------------------------------------
    def prepare(self, classes: Sequence[str], domain: str = "industrial",
                references: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Called once per dataset before ``predict``: class names (for class-aware prompts), the
        domain, and for few-shot methods the normal reference images per class."""

    def predict(self, batch: dict[str, Any]) -> Prediction:
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # The trainer calls the (DDP / DeepSpeed wrapped) module, so the training loss is forward.
        return self.loss(batch)

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is training-free")

    def trainable_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of everything but the frozen backbone (what checkpoints hold)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.text_cache.clear()
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit {type(self).__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


    def load_checkpoint(self, path: str) -> None:
        """Load trainable state from ``final.pt``, a step checkpoint's ``trainer.pt`` or its folder.

        Files are read with ``weights_only=True``; a checkpoint of another method or backbone, or an
        unreadable one, is a :class:`~zsadx.models.checkpoints.CheckpointError` naming the file."""
        from zsadx.models.checkpoints import load_into

        load_into(self, path)


def method_config_type(data: dict, key: str) -> type:
    """``choose_type`` for a ``method:`` section: the config class registered for ``method.name``."""
    from zsadx.models.methods import load_all

    reg = load_all()
    name = data.get("name")
    if not name:
        raise ConfigError(f"'{key}.name' is required: one of {', '.join(reg.names())}")
    if name not in reg:
        raise ConfigError(f"'{key}.name': unknown method '{name}'" + suggest(name, reg.names())
                          + f"; known: {', '.join(reg.names())}")
    return reg.get(name).config_cls


def build_method(cfg: MethodConfig, backbone: Optional[ClipBackbone] = None) -> Method:
    from zsadx.models.methods import load_all

    cls = load_all().get(cfg.name)
    cfg.apply_paper_compat()
    return cls(cfg, backbone)


def method_field() -> Any:
    return dataclasses.field(default_factory=MethodConfig, metadata={"choose_type": method_config_type})
