"""WebDataset shards: the writer, the index, and a strict reader.

On-disk format (``FORMAT_VERSION``):

* one group of shards per (dataset, class, split), named ``{dataset}-{class}-{split}-{n:05d}.tar``,
  so an evaluation reads one class or dataset without touching the others;
* per sample ``{key}.img.{png|webp|jpg}`` (RGB, resized bicubically to ``size`` x ``size`` or kept at
  the original size), for anomalous images with masks ``{key}.mask.png`` (the binary mask resized
  bilinearly: 8-bit coverage, from which "bilinear then > 0.5" is exact) and ``{key}.maskn.png``
  (resized with nearest neighbour), and ``{key}.json`` (the manifest record's metadata);
* ``index.json`` written last: shards, sample counts per class and split, sizes, format version.

Each group's shards are written to temporary names and renamed when the group is complete; a
marker in ``_progress/`` records finished groups, so an interrupted run is detectable (no
``index.json``) and restartable (finished groups are skipped).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import tarfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from PIL import Image

from zsadx.errors import UserError
from zsadx.data.records import Record, read_manifest
from zsadx.data.transforms import nearest_mask, resize_image, soft_mask

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
PROGRESS = "_progress"


class ShardError(UserError, RuntimeError):
    """A shard is missing, truncated or corrupt; the message names the shard and the sample key."""


class IndexError_(ShardError):
    pass


def parse_size(text: str | int) -> int:
    """'256MB' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB)")
    mult = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
            "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_+-]", "_", name)


def group_name(dataset: str, cls: str, split: str) -> str:
    return f"{_safe(dataset)}-{_safe(cls)}-{_safe(split)}"


@dataclass(frozen=True)
class EncodeOptions:
    size: Optional[int] = 518
    format: str = "png"     # png (lossless), webp (lossless), jpg (lossy, quality)
    quality: int = 95


def encode_sample(rec: Record, opts: EncodeOptions) -> dict[str, bytes]:
    """Read, resize and encode one record; errors name the file."""
    files: dict[str, bytes] = {}
    try:
        with Image.open(rec.image) as im:
            im = resize_image(im, opts.size) if opts.size else im.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ShardError(f"{rec.image}: unreadable image ({exc}) for key {rec.key}") from exc
    buf = io.BytesIO()
    if opts.format == "png":
        im.save(buf, "PNG", compress_level=1)
    elif opts.format == "webp":
        im.save(buf, "WEBP", lossless=True, method=0)
    elif opts.format == "jpg":
        im.save(buf, "JPEG", quality=opts.quality)
    else:
        raise ValueError(f"unknown image format {opts.format!r}: png, webp or jpg")
    files[f"img.{opts.format}"] = buf.getvalue()
    if rec.mask:
        with Image.open(rec.mask) as m:
            m.load()
            if opts.size is None:  # original size: both rules give the binary mask itself
                soft = hard = nearest_mask(m, 0, rec.mask_threshold)
            else:
                soft = soft_mask(m, opts.size, rec.mask_threshold)
                hard = nearest_mask(m, opts.size, rec.mask_threshold)
        for name, img in (("mask.png", soft), ("maskn.png", hard)):
            b = io.BytesIO()
            img.save(b, "PNG", compress_level=6)
            files[name] = b.getvalue()
    meta = {"key": rec.key, "label": rec.label, "cls": rec.cls, "dataset": rec.dataset, "domain": rec.domain,
            "split": rec.split, "specie": rec.specie, "has_mask": rec.mask is not None,
            "original_size": [rec.width, rec.height], "source": rec.source, "sha1": rec.sha1}
    files["json"] = json.dumps(meta).encode()
    return files


def _add(tar: tarfile.TarFile, key: str, files: dict[str, bytes]) -> int:
    n = 0
    for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        tar.addfile(info, io.BytesIO(data))
        n += len(data) + 512
    return n


def write_shards(manifest: str | os.PathLike, out: str | os.PathLike, size: Optional[int] = 518,
                 shard_size: str | int = "256MB", fmt: str = "png", quality: int = 95, workers: int = 2,
                 max_count: int = 10_000, progress: bool = True) -> dict:
    """Shard a manifest into ``out``; resumes an interrupted run; returns the index."""
    from tqdm import tqdm

    records = read_manifest(manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS).mkdir(exist_ok=True)
    limit = parse_size(shard_size)
    opts = EncodeOptions(size=size, format=fmt, quality=quality)
    settings = {"image_size": size, "image_format": fmt, "quality": quality, "format_version": FORMAT_VERSION}
    if (out / INDEX).exists():
        (out / INDEX).unlink()  # rewritten last; its absence marks a run in progress
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[group_name(r.dataset, r.cls, r.split)].append(r)
    todo = []
    for g, recs in sorted(groups.items()):
        marker = out / PROGRESS / f"{g}.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("settings") == settings and done.get("keys") == [r.key for r in recs]:
                continue
        todo.append(g)
    bar = tqdm(total=sum(len(groups[g]) for g in todo), desc="shard", unit="img", disable=not progress)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        for g in todo:
            recs = groups[g]
            for old in out.glob(f"{g}-*.tar*"):
                old.unlink()
            shards, n_shard, tar, written, count, tmp_name = [], 0, None, 0, 0, None

            def close() -> None:
                nonlocal tar
                tar.close()
                final = out / tmp_name[: -len(".tmp")]
                os.replace(out / tmp_name, final)
                shards.append({"name": final.name, "count": count, "bytes": final.stat().st_size})
                tar = None

            for rec, files in zip(recs, pool.map(encode_sample, recs, [opts] * len(recs), chunksize=8)):
                if tar is None:
                    tmp_name = f"{g}-{n_shard:05d}.tar.tmp"
                    tar = tarfile.open(out / tmp_name, "w", format=tarfile.USTAR_FORMAT)
                    written, count = 0, 0
                    n_shard += 1
                written += _add(tar, rec.key, files)
                count += 1
                bar.update()
                if written >= limit or count >= max_count:
                    close()
            if tar is not None:
                close()
            r0 = recs[0]
            counts = {"normal": sum(1 for r in recs if not r.label), "anomalous": sum(1 for r in recs if r.label),
                      "masks": sum(1 for r in recs if r.mask)}
            marker = {"group": g, "dataset": r0.dataset, "cls": r0.cls, "split": r0.split, "domain": r0.domain,
                      "shards": shards, "counts": counts, "settings": settings, "keys": [r.key for r in recs]}
            tmp = out / PROGRESS / f"{g}.json.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, out / PROGRESS / f"{g}.json")
    bar.close()
    index = {"format_version": FORMAT_VERSION, **settings, "groups": []}
    for g in sorted(groups):
        m = json.loads((out / PROGRESS / f"{g}.json").read_text())
        m.pop("keys")
        m.pop("settings")
        index["groups"].append(m)
    index["samples"] = sum(sum(s["count"] for s in g["shards"]) for g in index["groups"])
    index["bytes"] = sum(sum(s["bytes"] for s in g["shards"]) for g in index["groups"])
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)
    return index


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardRef:
    path: str
    count: int
    dataset: str
    cls: str
    split: str


def load_index(root: str | os.PathLike) -> dict:
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        hint = (" An interrupted `zsadx data shard` left it unfinished: run the same command again to resume."
                if (root / PROGRESS).is_dir() else " Create shards with `zsadx data shard MANIFEST --out DIR`.")
        raise ShardError(f"{path}: no shard index.{hint}")
    index = json.loads(path.read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {index.get('format_version')} but this zsadx reads "
                         f"version {FORMAT_VERSION}. Re-shard with `zsadx data shard MANIFEST --out {root}`.")
    return index


def select_shards(root: str | os.PathLike, dataset: str | None = None, classes: Sequence[str] | None = None,
                  split: str | None = "test") -> list[ShardRef]:
    """The shards of the requested dataset / classes / split, from the index (nothing else is opened)."""
    from zsadx.config import suggest

    root = Path(root)
    index = load_index(root)
    groups = index["groups"]
    if dataset is not None:
        names = {g["dataset"] for g in groups}
        if dataset not in names:
            raise ShardError(f"{root}: no dataset '{dataset}' in the shards" + suggest(dataset, names)
                             + f"; present: {', '.join(sorted(names))}")
        groups = [g for g in groups if g["dataset"] == dataset]
    if classes:
        present = {g["cls"] for g in groups}
        missing = [c for c in classes if c not in present]
        if missing:
            raise ShardError(f"{root}: class(es) {missing} not in the shards" + suggest(missing[0], present))
        groups = [g for g in groups if g["cls"] in set(classes)]
    if split is not None:
        groups = [g for g in groups if g["split"] == split]
    return [ShardRef(str(root / s["name"]), s["count"], g["dataset"], g["cls"], g["split"])
            for g in groups for s in g["shards"]]


def iter_tar(path: str, skip_errors: bool = False) -> Iterator[dict[str, bytes]]:
    """Samples of one tar as {'__key__': key, ext: bytes}; a broken tar raises naming the last key."""
    key, sample = None, {}
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name
                slash = base.rfind("/")
                dot = base.find(".", slash + 1)
                k, ext = base[:dot], base[dot + 1:]
                if k != key:
                    if sample:
                        yield sample
                    key, sample = k, {"__key__": k}
                f = tar.extractfile(member)
                sample[ext] = f.read()
                if len(sample[ext]) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"{path}: corrupt or truncated shard near sample key '{key}' ({exc}). "
                         "Re-create it with `zsadx data shard`.") from exc
    if sample:
        yield sample


def add_parser(dsub) -> None:
    p = dsub.add_parser("shard", help="manifest -> WebDataset shards + index.json (resumable)")
    p.add_argument("manifest", help="manifest.jsonl or the folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="518", help="stored image side in px, or 'original'")
    p.add_argument("--shard-size", default="256MB")
    p.add_argument("--format", default="png", choices=["png", "webp", "jpg"])
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (jpg only)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    size = None if args.size == "original" else int(args.size)
    index = write_shards(args.manifest, args.out, size=size, shard_size=args.shard_size, fmt=args.format,
                         quality=args.quality, workers=args.workers)
    n_shards = sum(len(g["shards"]) for g in index["groups"])
    print(f"{index['samples']} samples in {n_shards} shards ({index['bytes'] / 1e6:.1f} MB) "
          f"under {args.out}, {len(index['groups'])} groups (dataset x class x split)")
    return 0
