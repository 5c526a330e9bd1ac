"""Image and mask transforms, applied consistently to both.

The seeds resize images bicubically to S x S (aspect ratio squashed) and normalise with OpenAI's
mean/std. Masks are where they differ: AnomalyCLIP, AdaCLIP and FAPrompt resize the 0/255 mask
bilinearly and keep > 0.5; ACD-CLIP and anomalib resize with nearest neighbour. Both rules are
offered (``mask_resize``); shards keep what each rule needs (see ``shards.py``).

Every image file zsadx reads (conversion, sharding, ``zsadx predict``, the loaders) goes through
:func:`load_image` (one-line :class:`ImageError` naming the file for unreadable files and
decompression bombs) and :func:`to_rgb8` (high-bit-depth images scaled to 8 bits, not clipped).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zsadx.errors import UserError
from zsadx.models.backbone import OPENAI_MEAN, OPENAI_STD

MaskResize = Literal["bilinear", "nearest"]


class ImageError(UserError, ValueError):
    """An image file that cannot be read (not an image, truncated, too large); names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # crosses process pools (sharding workers) intact
        return type(self), (self.path, self.reason)


def load_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """The decoded image file; anything wrong with the file is an :class:`ImageError` naming it.

    Pillow's decompression-bomb guard is kept and made strict: an image above
    ``Image.MAX_IMAGE_PIXELS`` (89 M pixels, e.g. 30000 x 30000) is refused, not decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
    except FileNotFoundError:
        raise ImageError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise ImageError(path, f"is a folder, not an image file ({what})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"{what} too large to decode safely ({exc}); Pillow's limit is "
                               f"{Image.MAX_IMAGE_PIXELS} pixels: downscale it first") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, f"not an image file (Pillow cannot identify it; {what})") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, ValueError...)
        raise ImageError(path, f"{type(exc).__name__}: {exc}") from exc
    return im


# Modes whose samples exceed 8 bits. Pillow's own convert("RGB") clips them at 255, which turns a
# 16-bit image (nearly) white; to_rgb8 scales them by their bit depth instead.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def full_scale(im: Image.Image, values: np.ndarray) -> float:
    """The value that maps to 255: 2^bits - 1 of the image's bit depth.

    I;16*: 16 bits. I (32-bit integers, how Pillow may decode 16-bit PNG/TIFF): 16 bits when every
    value fits (<= 65535), else 32 bits. F (32-bit float): 1.0 when every value lies in [0, 1]
    (normalised images), else as I.
    """
    if im.mode.startswith("I;16"):
        return 65535.0
    top = float(np.nanmax(values)) if values.size else 0.0
    if im.mode == "F" and top <= 1.0:
        return 1.0
    return 65535.0 if top <= 65535 else float(2 ** 32 - 1)


def to_rgb8(im: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. High-bit-depth grey images are scaled, not clipped:
    ``round(clip(value, 0, full) * 255 / full)`` with ``full = 2^bits - 1`` (:func:`full_scale`)."""
    if im.mode == "RGB":
        return im
    if im.mode not in HIGH_BIT_MODES:
        return im.convert("RGB")
    values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
    full = full_scale(im, values)
    grey = np.rint(np.clip(values, 0.0, full) * (255.0 / full)).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def resize_image(im: Image.Image, size: int) -> Image.Image:
    im = to_rgb8(im)
    return im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC)


def soft_mask(mask: Image.Image, size: int, threshold: int = 0) -> Image.Image:
    """Binarise at ``threshold`` (0/255), then resize bilinearly: 8-bit coverage of each pixel."""
    binary = Image.fromarray(((np.asarray(mask.convert("L")) > threshold) * 255).astype(np.uint8))
    return binary if binary.size == (size, size) else binary.resize((size, size), Image.BILINEAR)


def nearest_mask(mask: Image.Image, size: int, threshold: int = 0) -> Image.Image:
    """Binarise at ``threshold`` (0/255), then resize with nearest neighbour (size 0: keep)."""
    binary = Image.fromarray(((np.asarray(mask.convert("L")) > threshold) * 255).astype(np.uint8))
    return binary if not size or binary.size == (size, size) else binary.resize((size, size), Image.NEAREST)


def normalise(images: torch.Tensor, mean: tuple[float, float, float] = OPENAI_MEAN,
              std: tuple[float, float, float] = OPENAI_STD) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 normalised with mean/std, on the images' device.

    Loaders hand over uint8 so that workers only decode and the device does the arithmetic;
    float images are taken as already normalised and returned unchanged. The formula is the one
    :meth:`EvalTransform.image` uses ((v / 255 - mean) / std in float32), so both paths agree to
    float rounding.
    """
    if images.dtype != torch.uint8:
        return images
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - m) / s


def _as_image(im: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image of uint8 (3, H, W) pixels (raw members, PNGs decoded by libspng); PIL images as given."""
    if isinstance(im, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)), "RGB")
    return im


@dataclass
class EvalTransform:
    """PIL image (+ mask) -> uint8 pixels (3, S, S) (loaders) or a normalised float tensor (3, S, S)
    (``zsadx predict``), and a uint8 mask (S, S) in {0, 1}."""

    size: int = 518
    mask_resize: MaskResize = "bilinear"
    mask_size: int | None = None  # metrics resolution, when it differs from the model input
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def pixels(self, im: Image.Image | np.ndarray) -> torch.Tensor:
        """The image resized to S x S as uint8 (3, S, S), not normalised: what the loaders yield
        (:func:`normalise` runs on the device). ``im``: a PIL image, or uint8 (3, H, W) pixels (a raw
        shard member; taken as they are, without a copy, when already S x S)."""
        if isinstance(im, np.ndarray) and im.shape[1:] == (self.size, self.size):
            return torch.from_numpy(im)
        arr = np.asarray(resize_image(_as_image(im), self.size))
        # One copy that also turns HWC into CHW: the batch stack is then a plain memcpy.
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def image(self, im: Image.Image | np.ndarray) -> torch.Tensor:
        """Normalised float (3, S, S), computed on the CPU (``zsadx predict``); equal to
        ``normalise(self.pixels(im))`` to float rounding. ``im`` as for :meth:`pixels`."""
        arr = np.asarray(resize_image(_as_image(im), self.size), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (t - mean) / std

    def mask(self, soft: Image.Image | None, hard: Image.Image | None = None) -> torch.Tensor:
        """Binary mask from the stored soft (bilinear) or hard (nearest) mask; zeros when absent."""
        size = self.mask_size or self.size
        if soft is None and hard is None:
            return torch.zeros(size, size, dtype=torch.uint8)
        if self.mask_resize == "nearest":
            src = hard if hard is not None else soft
            arr = np.asarray(nearest_mask(src, size, 127 if hard is None else 0))
            return torch.from_numpy((arr > 0).astype(np.uint8))
        src = soft if soft is not None else hard
        m = src if src.mode == "L" else src.convert("L")
        if m.size != (size, size):
            m = m.resize((size, size), Image.BILINEAR)
        # torchvision's ToTensor then "> 0.5", as the seeds do: 8-bit value > 127.5.
        return torch.from_numpy((np.asarray(m) > 127).astype(np.uint8))
