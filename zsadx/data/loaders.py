"""Shard loaders: exactly-once evaluation and a resampled, weighted training mixture.

Evaluation (:class:`EvalShards`): the index gives every shard's sample count, so the requested
samples have a global order; each consumer (rank x worker) takes one contiguous slice of it and
opens only the shards that slice touches. Every sample is seen exactly once across ranks and
workers, however few shards there are (webdataset's shard-level split needs shards >= ranks x
workers, the open_clip limitation).

Training (:class:`TrainMixture`): each consumer draws shards with replacement from each source
(as open_clip's resampled mode), picks the source of every sample by weight, shuffles through a
buffer, and yields whole batches: exactly ``batches_per_epoch`` per rank, so DDP ranks stay in
step. Everything is seeded by (seed, epoch, rank, worker), so a run is reproducible.

Both yield uint8 images (N, 3, S, S) and uint8 masks: workers only read and decode, batches are
stacked into shared memory, and the consumer normalises on its device
(:func:`zsadx.data.transforms.normalise`). Shard roots may be local folders, http(s):// URLs or
pipe: commands (:mod:`zsadx.data.shards`).
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from zsadx.data.shards import ShardError, ShardRef, decode_raw, iter_tar, select_shards
from zsadx.data.transforms import EvalTransform

log = logging.getLogger(__name__)


def dist_info(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world size): explicit values, else torch.distributed, else the launcher's env vars."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def decode_sample(sample: dict[str, bytes], transform: EvalTransform, shard: str = "") -> dict:
    """Tar sample -> {'image', 'mask', 'label', 'cls', 'dataset', 'domain', 'key', 'has_mask'}.

    ``image`` is uint8 (3, S, S), not normalised (:func:`zsadx.data.transforms.normalise` runs on the
    device): a worker only decodes, and a quarter of float32's bytes crosses the worker pipe.
    """
    key = sample.get("__key__", "?")
    try:
        meta = json.loads(sample["json"])
        image = transform.pixels(_image(sample))
        mask = transform.mask(*_masks(sample, transform))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt sample
        raise ShardError(f"{shard}: corrupt sample '{key}' ({type(exc).__name__}: {exc})") from exc
    return {"image": image, "mask": mask, "label": int(meta["label"]), "cls": meta["cls"],
            "dataset": meta["dataset"], "domain": meta["domain"], "key": meta["key"],
            "has_mask": bool(meta["has_mask"])}


try:  # libspng decodes PNG ~1.5x faster than Pillow's libpng path (`pip install zsadx[fast-png]`)
    import pyspng as _spng
except ImportError:  # pragma: no cover - optional
    _spng = None


def _spng_load(data: bytes, channels: int) -> Optional[np.ndarray]:
    """8-bit PNG pixels through libspng: (H, W, 3) for ``channels=3``, (H, W) for 1; None when it is
    not installed or the PNG is another format (or one it refuses): the caller then decodes with
    Pillow, which decides. PNG is lossless, so both give the same pixels."""
    if _spng is None:
        return None
    try:
        arr = _spng.load(data if isinstance(data, bytes) else bytes(data))  # its binding takes bytes only
    except RuntimeError:
        return None
    shape_ok = arr.ndim == 2 if channels == 1 else (arr.ndim == 3 and arr.shape[2] == channels)
    return arr if arr.dtype == np.uint8 and shape_ok else None


def _png_pixels(data: bytes) -> Optional[np.ndarray]:
    """uint8 (3, H, W) pixels of an RGB PNG through libspng, or None (see :func:`_spng_load`)."""
    arr = _spng_load(data, 3)
    return None if arr is None else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _image(sample: dict[str, bytes]) -> Image.Image | np.ndarray:
    """The sample's image: uint8 (3, H, W) pixels from a raw member or an RGB PNG (libspng, when
    installed), else the decoded PIL image."""
    if "img.npy" in sample:
        return decode_raw(sample["img.npy"], 3)
    ext = next(k for k in sample if k.startswith("img."))
    if ext == "img.png":
        pixels = _png_pixels(sample[ext])
        if pixels is not None:
            return pixels
    with Image.open(io.BytesIO(sample[ext])) as im:
        im.load()
    return im


def _masks(sample: dict[str, bytes], transform: EvalTransform) -> tuple[Image.Image | None, Image.Image | None]:
    """(soft, hard) for ``transform.mask``: the stored mask its rule reads (``mask``: bilinear
    coverage, ``maskn``: nearest), the other None -- or, when that one is not stored, the other."""
    names = ("maskn", "mask") if transform.mask_resize == "nearest" else ("mask", "maskn")
    for name in names:
        im = _mask(sample, name)
        if im is not None:
            return (im, None) if name == "mask" else (None, im)
    return None, None


def _mask(sample: dict[str, bytes], name: str) -> Image.Image | None:
    """A stored mask as an 8-bit greyscale image (libspng when installed: 3x faster than Pillow
    on these masks), or None."""
    if f"{name}.npy" in sample:
        return Image.fromarray(decode_raw(sample[f"{name}.npy"], 1), "L")
    if f"{name}.png" not in sample:
        return None
    data = sample[f"{name}.png"]
    arr = _spng_load(data, 1)
    return Image.fromarray(arr, "L") if arr is not None else Image.open(io.BytesIO(data))


class EvalShards(IterableDataset):
    """Each sample of the selected dataset/classes/split exactly once across ranks and workers."""

    def __init__(self, root: str | os.PathLike, dataset: str | None = None, classes: Sequence[str] | None = None,
                 split: str | None = "test", transform: EvalTransform | None = None,
                 rank: int | None = None, world_size: int | None = None):
        self.shards = select_shards(root, dataset, classes, split)
        if not self.shards:
            raise ShardError(f"{root}: no shards for dataset={dataset} classes={classes} split={split}")
        self.transform = transform or EvalTransform()
        self._rank, self._world = rank, world_size
        self.total = sum(s.count for s in self.shards)

    def slice_for(self, consumer: int, consumers: int) -> tuple[int, int]:
        return consumer * self.total // consumers, (consumer + 1) * self.total // consumers

    def rank_slice(self, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
        """[lo, hi): the global sample positions this rank evaluates."""
        r, w = dist_info(rank if rank is not None else self._rank, world_size or self._world)
        return self.total * r // w, self.total * (r + 1) // w

    def rank_count(self, rank: int | None = None, world_size: int | None = None) -> int:
        lo, hi = self.rank_slice(rank, world_size)
        return hi - lo

    def rank_class_counts(self, rank: int | None = None, world_size: int | None = None) -> dict[str, int]:
        """How many samples of each class this rank's slice holds (from the index: nothing is read)."""
        lo, hi = self.rank_slice(rank, world_size)
        counts: dict[str, int] = {}
        offset = 0
        for shard in self.shards:
            inside = min(hi, offset + shard.count) - max(lo, offset)
            if inside > 0:
                counts[shard.cls] = counts.get(shard.cls, 0) + inside
            offset += shard.count
        return counts

    def __iter__(self) -> Iterator[dict]:
        wid, nw = worker()
        # Slice first by rank, then by worker, so each rank's count does not depend on its workers.
        r_lo, r_hi = self.rank_slice()
        n = r_hi - r_lo
        lo, hi = r_lo + n * wid // nw, r_lo + n * (wid + 1) // nw
        offset = 0
        for shard in self.shards:
            s_lo, s_hi = offset, offset + shard.count
            offset = s_hi
            if s_hi <= lo or s_lo >= hi:
                continue
            seen = 0
            for i, sample in enumerate(iter_tar(shard.path)):
                seen = i + 1
                g = s_lo + i
                if g >= hi:
                    break
                if g >= lo:
                    yield decode_sample(sample, self.transform, shard.path)
            else:
                if seen != shard.count:
                    raise ShardError(f"{shard.path}: truncated shard: the index lists {shard.count} samples, "
                                     f"the file holds {seen}. Re-create it with `zsadx data shard`.")


@dataclass
class MixtureSource:
    """One part of a training mixture: a dataset's split (optionally some classes) with a weight."""

    shards: str                       # folder with index.json
    dataset: Optional[str] = None
    split: Optional[str] = "test"     # the papers train on auxiliary datasets' test splits
    classes: Optional[list[str]] = None
    weight: float = 1.0


def collate(samples: list[dict]) -> dict:
    """Samples -> a batch: tensors stacked, ints and bools as tensors, the rest as lists."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = _stack(vals) if isinstance(vals[0], torch.Tensor) else (
            torch.tensor(vals) if isinstance(vals[0], (int, bool)) else vals)
    return out


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stacked; in a DataLoader worker straight into shared memory (as torch's default collate
    does), so the batch crosses the worker pipe without another copy."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(sum(t.numel() for t in tensors), device=first.device)
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class TrainMixture(IterableDataset):
    """Infinite, resampled, weighted mixture cut into a fixed number of batches per epoch and rank.

    ``mode='rank'``: every (rank, worker) resamples its own shards -- I/O scales with the ranks.
    ``mode='global'``: one stream seeded by (seed, epoch) defines global batches of
    ``batch_size x world`` samples and each rank decodes only its slice, so a run's batches, and
    hence its weights, do not depend on the number of processes (every rank reads the stream).
    ``skip_batches`` (set before iterating, for a resumed run) replays the first batches of the
    epoch without decoding them and yields ``{'_skipped': b}`` markers in their place, so the
    DataLoader's worker order -- and everything after -- is what the uninterrupted run saw.
    """

    def __init__(self, sources: Sequence[MixtureSource], batch_size: int, batches_per_epoch: int,
                 transform: EvalTransform | None = None, seed: int = 0, shuffle_buffer: int = 256,
                 max_skips: int = 100, rank: int | None = None, world_size: int | None = None,
                 mode: str = "rank"):
        if not sources:
            raise ValueError("a training mixture needs at least one source")
        self.sources = list(sources)
        self.refs: list[list[ShardRef]] = []
        for s in self.sources:
            refs = select_shards(s.shards, s.dataset, s.classes, s.split)
            if not refs:
                raise ShardError(f"{s.shards}: no shards for dataset={s.dataset} split={s.split} classes={s.classes}")
            self.refs.append(refs)
        w = np.array([s.weight for s in self.sources], dtype=float)
        if (w <= 0).any():
            raise ValueError("mixture weights must be positive")
        self.weights = w / w.sum()
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.transform = transform or EvalTransform()
        self.seed, self.shuffle_buffer, self.max_skips = seed, shuffle_buffer, max_skips
        self._rank, self._world = rank, world_size
        if mode not in ("rank", "global"):
            raise ValueError(f"mode must be 'rank' or 'global', got {mode!r}")
        self.mode = mode
        self.epoch = 0
        self.skip_batches = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _source_stream(self, i: int, rng: np.random.Generator) -> Iterator[tuple[str, dict]]:
        """Raw (undecoded) samples of source ``i`` from shards drawn with replacement."""
        refs = self.refs[i]
        p = np.array([r.count for r in refs], dtype=float)
        p /= p.sum()
        while True:
            ref = refs[rng.choice(len(refs), p=p)]
            try:
                for sample in iter_tar(ref.path):
                    yield ref.path, sample
            except ShardError as exc:
                self._skip(exc)

    def _skip(self, exc: Exception) -> None:
        self.skipped += 1
        log.warning("skipping (%d so far): %s", self.skipped, exc)
        if self.skipped > self.max_skips:
            raise ShardError(f"more than {self.max_skips} corrupt samples or shards skipped; last: {exc}") from exc

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        rank, world = dist_info(self._rank, self._world)
        wid, nw = worker()
        if self.mode == "global":
            streams_key, take, per_batch = [self.seed, self.epoch], slice(rank * self.batch_size,
                                                                           (rank + 1) * self.batch_size), \
                self.batch_size * world
        else:
            streams_key, take, per_batch = [self.seed, self.epoch, rank, wid], slice(0, self.batch_size), \
                self.batch_size
        rng = np.random.default_rng(streams_key)
        streams = [self._source_stream(i, np.random.default_rng(streams_key + [i])) for i in range(len(self.sources))]
        # The buffer holds encoded bytes (a few hundred KB each), decoded only when drawn.
        buffer: list[tuple[str, dict]] = []

        def next_raw() -> tuple[str, dict]:
            while len(buffer) < max(1, self.shuffle_buffer):
                buffer.append(next(streams[rng.choice(len(streams), p=self.weights)]))
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        def decoded(raw: list[tuple[str, dict]]) -> list[dict]:
            out, bad = [], 0
            for path, sample in raw:
                try:
                    out.append(decode_sample(sample, self.transform, path))
                except ShardError as exc:
                    self._skip(exc)
                    bad += 1
            # Corrupt samples are replaced by good ones of the same batch, so the shared stream of
            # global mode stays in step across ranks; a batch with none left draws more.
            while bad:
                if out:
                    out.append(out[bad % len(out)])
                    bad -= 1
                    continue
                path, sample = next_raw()
                try:
                    out.append(decode_sample(sample, self.transform, path))
                    bad -= 1
                except ShardError as exc:
                    self._skip(exc)
            return out

        for b in range(self.batches_per_epoch):
            # In global mode every worker replays the whole stream (raw bytes only) to stay in step.
            mine = b % nw == wid
            if self.mode == "rank" and not mine:
                continue
            raw = [next_raw() for _ in range(per_batch)]
            if not mine:
                continue
            if b < self.skip_batches:
                yield {"_skipped": b}
                continue
            yield collate(decoded(raw[take]))
