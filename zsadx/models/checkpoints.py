"""Method checkpoint files: safe reading, and the identity they record.

Every checkpoint file zsadx reads goes through :func:`safe_load`: ``torch.load`` with
``weights_only=True``, which unpickles tensors and plain values (dicts, lists, numbers, strings)
only. A file holding any other Python object (a pickle payload that would run code, or a
checkpoint of an older zsadx that pickled numpy RNG states) is refused unread, with one line naming
it. DeepSpeed's own optimizer shards are the one exception; the trainer hands them to DeepSpeed
only from the run's own folder.

What a checkpoint holds (all tensors and plain values):

* ``final.pt``: ``{"format": METHOD_FORMAT, "method": name, "backbone": {identity},
  "trainable_keys": [...], "state": {name: tensor}}``.
* ``checkpoints/step-N/trainer.pt`` (:mod:`zsadx.training.checkpoint`): ``{"format": TRAINER_FORMAT,
  "identity": {the same three keys}, "method": {name: tensor}, "optimizer": ..., ...}``.

:meth:`Method.load_checkpoint` accepts either file, or a step folder, and refuses a checkpoint of
another method or backbone with one line naming both. A plain ``{name: tensor}`` file (final.pt
of zsadx before checkpoint identities) is loaded with a warning: its tensor names and shapes are
still checked, but not the backbone it was trained on. A checkpoint of an official method
repository (e.g. AnomalyCLIP's ``epoch_15.pth``) is recognised and converted in memory
(:mod:`zsadx.models.official`), said in one log line.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from zsadx.errors import UserError
from zsadx.files import hash_file

log = logging.getLogger(__name__)

METHOD_FORMAT = "zsadx-method/1"
TRAINER_FORMAT = "zsadx-trainer/1"


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or of another method/backbone."""


# ------------------------------------------------------------------------------------------
# Reading and writing files
# ------------------------------------------------------------------------------------------

def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``; every failure is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):
            raise CheckpointError(
                f"{path}: {what} holds Python objects besides tensors and plain values, which zsadx never "
                f"unpickles (they can run code); not loaded. If an older zsadx wrote it, train again "
                f"(overwrite=true)") from None
        raise CheckpointError(f"{path}: {what} is not readable (truncated, or not a checkpoint): "
                              f"{_first_line(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is not readable (truncated, or not a checkpoint): "
                              f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def to_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory, so the file itself is written (and a full disk reported) by
    :mod:`zsadx.files`, with the errno that torch's own writer loses."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_method_checkpoint(method, path: str | os.PathLike) -> Path:
    """Write ``final.pt``: the method's trainable state and its identity, atomically."""
    from zsadx.files import atomic_write_bytes

    return atomic_write_bytes(path, to_bytes({"format": METHOD_FORMAT, **method_identity(method),
                                              "state": method.trainable_state_dict()}))


# ------------------------------------------------------------------------------------------
# Identity: which method on which backbone a checkpoint was trained for
# ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return hash_file(path).hexdigest()


def weights_sha256(pretrained: Optional[str]) -> Optional[str]:
    """sha256 of a local weights file (cached per path, size and mtime); None for a tag or random."""
    if not pretrained:
        return None
    p = Path(pretrained).expanduser()
    if not p.is_file():
        return None
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


def backbone_identity(backbone) -> dict:
    cfg = backbone.cfg
    return {"name": cfg.name, "pretrained": cfg.pretrained, "weights_sha256": weights_sha256(cfg.pretrained),
            "init_seed": cfg.init_seed if cfg.pretrained is None else None, "image_size": cfg.image_size,
            "width": backbone.width, "text_width": backbone.text_width, "layers": backbone.num_layers,
            "text_layers": backbone.num_text_layers, "patch_size": backbone.patch_size,
            "embed_dim": backbone.embed_dim}


def method_identity(method) -> dict:
    return {"method": method.cfg.name, "backbone": backbone_identity(method.backbone),
            "trainable_keys": sorted(method.trainable_state_dict())}


_SHAPE_KEYS = ("width", "text_width", "layers", "text_layers", "patch_size", "embed_dim")


def _same_backbone(a: dict, b: dict) -> bool:
    if any(a.get(k) != b.get(k) for k in _SHAPE_KEYS):
        return False
    if "auto" not in (a.get("name"), b.get("name")) and a.get("name") != b.get("name"):
        return False
    if a.get("weights_sha256") or b.get("weights_sha256"):  # local files: their content, wherever they lie
        return a.get("weights_sha256") == b.get("weights_sha256")
    if a.get("pretrained") is None or b.get("pretrained") is None:  # random weights: the seed draws them
        return a.get("pretrained") == b.get("pretrained") and a.get("init_seed") == b.get("init_seed")
    return a.get("pretrained") == b.get("pretrained")


def describe_backbone(b: dict) -> str:
    weights = (f"weights sha256 {b['weights_sha256'][:12]}" if b.get("weights_sha256")
               else f"pretrained {b.get('pretrained')}" if b.get("pretrained") is not None
               else f"random weights, init_seed {b.get('init_seed')}")
    return (f"{b.get('name')} ({weights}; width {b.get('width')}, text width {b.get('text_width')}, "
            f"{b.get('layers')}+{b.get('text_layers')} layers, patch {b.get('patch_size')})")


def check_identity(found: dict, method, path: Path) -> None:
    """One line naming both sides when the checkpoint was trained for another method or backbone."""
    want = method_identity(method)
    if found.get("method") != want["method"] or not _same_backbone(found.get("backbone") or {}, want["backbone"]):
        raise CheckpointError(
            f"{path}: a checkpoint of method '{found.get('method')}' on backbone "
            f"{describe_backbone(found.get('backbone') or {})}, but this is method '{want['method']}' on "
            f"backbone {describe_backbone(want['backbone'])}; evaluate it with the method config it was "
            f"trained with (the run's method.yaml)")
    trained_at, now = (found.get("backbone") or {}).get("image_size"), want["backbone"]["image_size"]
    if trained_at != now:
        log.warning("%s: trained at image size %s, evaluated at %s (positional embeddings are interpolated)",
                    path, trained_at, now)


# ------------------------------------------------------------------------------------------
# Reading any method checkpoint
# ------------------------------------------------------------------------------------------

def checkpoint_file(path: str | os.PathLike) -> Path:
    """A file as given; a step folder -> its trainer.pt; a run folder -> its final.pt."""
    p = Path(path)
    if p.is_dir():
        for name in ("trainer.pt", "final.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: a folder without trainer.pt (a step checkpoint) or final.pt (a finished run)")
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    return p


def read_trainable_state(path: str | os.PathLike, method) -> dict[str, torch.Tensor]:
    """The trainable state in ``path`` (final.pt, trainer.pt or a step folder), checked against
    ``method``'s identity."""
    file = checkpoint_file(path)
    obj = safe_load(file)
    if isinstance(obj, dict) and obj.get("format") == METHOD_FORMAT:
        identity, state = obj, obj.get("state")
    elif isinstance(obj, dict) and obj.get("format") == TRAINER_FORMAT:
        identity, state = obj.get("identity") or {}, obj.get("method")
    elif (official := read_official(obj, method, file)) is not None:
        return official
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        log.warning("%s: a plain state dict (zsadx before checkpoint identities): the method and backbone it "
                    "was trained for are not recorded, so only its tensor names and shapes are checked", file)
        identity, state = None, obj
    else:
        raise CheckpointError(f"{file}: not a zsadx method checkpoint (expected final.pt or a step "
                              f"checkpoint's trainer.pt) nor an official one ({official_sources()})")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{file}: its trainable state is not a mapping of tensors")
    if identity is not None:
        check_identity(identity, method, file)
    return state


def read_official(obj: Any, method, file: Path) -> Optional[dict[str, torch.Tensor]]:
    """An official repository's checkpoint (:mod:`zsadx.models.official`) converted in memory into
    ``method``'s trainable state, said in one log line; None if ``obj`` is no official format.
    Such files record no backbone: the shapes are checked, the weights cannot be."""
    from zsadx.models import official

    try:
        found = official.convert_official(obj, method)
    except CheckpointError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    if found is None:
        return None
    log.info("%s: %s", file, official.describe(*found))
    return found[1].state


def official_sources() -> str:
    from zsadx.models import official

    return ", ".join(f"{name}: {fmt.source}" for name, fmt in official.load_all().items()) or "none known"


def load_into(method, path: str | os.PathLike) -> None:
    """Load a checkpoint into ``method``; a mismatch of names or shapes is one line naming the file."""
    file = checkpoint_file(path)
    state = read_trainable_state(file, method)
    try:
        method.load_trainable_state_dict(state)
    except (ValueError, RuntimeError) as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise CheckpointError(f"{file}: does not fit {method.cfg.name}: {text[:400]}") from None


__all__ = ["METHOD_FORMAT", "TRAINER_FORMAT", "CheckpointError", "backbone_identity", "check_identity",
           "checkpoint_file", "describe_backbone", "load_into", "method_identity", "read_trainable_state",
           "safe_load", "save_method_checkpoint", "to_bytes", "weights_sha256"]
