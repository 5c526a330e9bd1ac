"""WebDataset shards: the writer, the index, and a strict reader.

On-disk format (``FORMAT_VERSION``):

* one group of shards per (dataset, class, split), named ``{dataset}-{class}-{split}-{n:05d}.tar``,
  so an evaluation reads one class or dataset without touching the others;
* per sample ``{key}.img.{png|webp|jpg|npy}`` (RGB, resized bicubically to ``size`` x ``size`` or kept
  at the original size; ``npy``: the ``raw`` format, uncompressed uint8 3 x H x W (channels first, as
  the model takes it) in NumPy's header + bytes layout: lossless, read without decoding), for anomalous images with masks ``{key}.mask.{png|npy}``
  (the binary mask resized bilinearly: 8-bit coverage, from which "bilinear then > 0.5" is exact) and
  ``{key}.maskn.{png|npy}`` (resized with nearest neighbour), and ``{key}.json`` (the manifest record's
  metadata); PNG members are written by :mod:`zsadx.data.png` (filter Up, zlib RLE: quick to decode);
* ``index.json``: shards, sample counts per class and split, the grey level the group's masks were cut
  at (``mask_threshold``, None without masks), sizes, format version, and per dataset which classes
  the folder holds (``datasets``: classes, catalog_classes, missing_classes, subset).

One folder holds every dataset (grids need that), so a run MERGES into it: the (dataset, class)
pairs of the manifest replace exactly their groups and tars; every other group stays byte for byte.
The marker of a group in ``_progress/`` (written when its tars are complete) is the source of
truth and the index is rebuilt from the markers, so an interrupted run is restartable (finished
groups are skipped) and detectable (no ``index.json`` after a first run; otherwise the index lists
the groups being rewritten under ``pending``). zsadx deletes only tars its markers list, inside the
folder, and its own temp files; the folder carries an ownership marker and a lock held while writing.
One folder holds one image size and format: a run with other settings that would leave groups of
the old settings is refused.
Reading (:func:`load_index`, :func:`select_shards`, :func:`iter_tar`) takes a local folder or a
remote root: ``http(s)://host/path/folder`` or ``pipe:COMMAND`` where ``{name}`` in COMMAND stands for
the file inside the folder (``index.json``, a tar), e.g. ``pipe:aws s3 cp s3://bucket/shards/{name} -``.
Remote files are streamed through webdataset's ``gopen`` (curl for http, a shell for pipe:), never
saved to disk; shard names from a remote index must be plain file names.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
import urllib.parse
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from zsadx.data.png import encode_png
from zsadx.data.records import Record, mask_threshold_of, read_manifest
from zsadx.data.transforms import ImageError, load_image, nearest_mask, resize_image, soft_mask, to_rgb8
from zsadx.errors import UnsafePathError, UserError
from zsadx.files import (OWNER_FILE, FolderLock, atomic_write_json, atomic_write_text, is_temp_name, mark_owned,
                         owner_kind, resolve_within, safe_component, temp_path, temp_writer_alive)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
PROGRESS = "_progress"
OWNER_KIND = "shards"
# Temp names of older zsadx versions (they are removed like today's ``.<name>.tmp-<pid>-<id>``).
_LEGACY_TEMP = re.compile(r"[A-Za-z0-9_+-]+-\d{5}\.tar\.tmp|index\.json\.tmp")


class ShardError(UserError, RuntimeError):
    """A shard is missing, truncated or corrupt; the message names the shard and the sample key."""


class IndexError_(ShardError):
    pass


IMAGE_FORMATS = ("png", "webp", "jpg", "raw")


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
    format: str = "png"     # png (lossless), webp (lossless), jpg (lossy, quality), raw (uncompressed)
    quality: int = 95


def encode_sample(rec: Record, opts: EncodeOptions) -> dict[str, bytes]:
    """Read, resize and encode one record; errors name the file."""
    files: dict[str, bytes] = {}
    im = _load(rec.image, "image", rec.key)
    im = resize_image(im, opts.size) if opts.size else to_rgb8(im)
    if opts.format == "raw":  # channels first, as the model takes it: reading is then one copy
        files["img.npy"] = encode_raw(np.asarray(im).transpose(2, 0, 1))
    else:
        files[f"img.{opts.format}"] = _encode_compressed(im, opts)
    if rec.mask:
        m = _load(rec.mask, "mask", rec.key)
        if opts.size is None:  # original size: both rules give the binary mask itself
            soft = hard = nearest_mask(m, 0, rec.mask_threshold)
        else:
            soft = soft_mask(m, opts.size, rec.mask_threshold)
            hard = nearest_mask(m, opts.size, rec.mask_threshold)
        for name, img in (("mask", soft), ("maskn", hard)):
            files.update([_encode_mask(name, img, opts.format)])
    meta = {"key": rec.key, "label": rec.label, "cls": rec.cls, "dataset": rec.dataset, "domain": rec.domain,
            "split": rec.split, "specie": rec.specie, "has_mask": rec.mask is not None,
            "original_size": [rec.width, rec.height], "source": rec.source, "sha1": rec.sha1}
    files["json"] = json.dumps(meta).encode()
    return files


def _encode_compressed(im: Image.Image, opts: EncodeOptions) -> bytes:
    buf = io.BytesIO()
    if opts.format == "png":
        return encode_png(np.asarray(im))
    elif opts.format == "webp":
        im.save(buf, "WEBP", lossless=True, method=0)
    elif opts.format == "jpg":
        im.save(buf, "JPEG", quality=opts.quality)
    else:
        raise ValueError(f"unknown image format {opts.format!r}: {', '.join(IMAGE_FORMATS)}")
    return buf.getvalue()


def _encode_mask(name: str, mask: Image.Image, fmt: str) -> tuple[str, bytes]:
    """(member extension, bytes): raw shards keep masks raw too (a PNG decode would cost about as
    much as the raw image copy); the others store PNG."""
    if fmt == "raw":
        return f"{name}.npy", encode_raw(np.asarray(mask))
    return f"{name}.png", encode_png(np.asarray(mask if mask.mode == "L" else mask.convert("L")))


# The raw members: NumPy's .npy layout (version 1.0 header + C-order bytes), uint8 only. Read back by
# parsing the header and checking the byte count, never through np.load (no pickles, no giant
# allocations from a hostile header).
RAW_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
_RAW_HEADER_MAX = 2048  # magic, length, and numpy's 1024-character header limit


def encode_raw(pixels: np.ndarray) -> bytes:
    """uint8 (3, H, W) or (H, W) pixels -> .npy bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(pixels, dtype=np.uint8), version=(1, 0),
                              allow_pickle=False)
    return buf.getvalue()


def decode_raw(data: bytes | bytearray, channels: int) -> np.ndarray:
    """.npy bytes -> uint8 (channels, H, W), or (H, W) when ``channels`` is 1, sharing ``data``'s
    memory; a ValueError says what is wrong (the caller names the shard and key)."""
    head = io.BytesIO(bytes(memoryview(data)[:_RAW_HEADER_MAX]))  # the header only: no copy of the pixels
    try:
        if np.lib.format.read_magic(head) != (1, 0):
            raise ValueError("a .npy version other than 1.0")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head, max_header_size=1024)
    except ValueError as exc:
        raise ValueError(f"not a zsadx raw member ({exc})") from None
    want = "(H, W)" if channels == 1 else f"({channels}, H, W)"
    if (dtype != np.uint8 or fortran or len(shape) != (2 if channels == 1 else 3)
            or (channels > 1 and shape[0] != channels)):
        raise ValueError(f"raw member holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, "
                         f"expected uint8 {want}")
    if shape[-1] * shape[-2] > RAW_MAX_PIXELS:
        raise ValueError(f"raw member of {shape[-2]} x {shape[-1]} pixels exceeds the {RAW_MAX_PIXELS}-pixel limit")
    start, need = head.tell(), int(np.prod(shape))
    if len(data) - start != need:
        raise ValueError(f"raw member holds {len(data) - start} bytes of pixels, its header says {need}")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


def _load(path: str, what: str, key: str):
    try:
        return load_image(path, what)
    except ImageError as exc:
        raise ShardError(f"{exc} (manifest key {key}): fix or remove the file and convert the dataset again") from exc


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
                 max_count: int = 10_000, progress: bool = True, wait_lock: bool = False) -> dict:
    """Shard a manifest into ``out``, merging with the groups already there; returns the index.

    The unit of replacement is a (dataset, class): the manifest's classes replace exactly their
    groups (and tars) in ``out``; every other group stays as it was, tars and index entry byte for
    byte. A group whose marker already matches (same keys, same settings) is not rewritten, so an
    interrupted run resumes. The folder is locked while it is written (``wait_lock``: wait for
    another writer instead of refusing).
    """
    if is_remote(out):
        raise ShardError(f"--out {out}: shards are written to a local folder; shard there, then upload the folder "
                         f"(e.g. `aws s3 sync DIR s3://bucket/shards`) and read it back as an http(s):// or pipe: root")
    records = read_manifest(manifest)
    out = Path(out)
    check_shard_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if owner_kind(out) != OWNER_KIND:
        mark_owned(out, OWNER_KIND)
    with FolderLock(out, "the shard folder", wait=wait_lock):
        (out / PROGRESS).mkdir(exist_ok=True)
        remove_stale_temps(out)
        return _write_locked(records, out, EncodeOptions(size=size, format=fmt, quality=quality),
                             parse_size(shard_size), workers, max_count, progress)


def _write_locked(records: list[Record], out: Path, opts: EncodeOptions, limit: int, workers: int,
                  max_count: int, progress: bool) -> dict:
    from tqdm import tqdm

    settings = {"image_size": opts.size, "image_format": opts.format, "quality": opts.quality,
                "format_version": FORMAT_VERSION}
    groups = group_records(records)
    existing = read_groups(out)
    _check_same_identity(groups, existing)
    classes = {(recs[0].dataset, recs[0].cls) for recs in groups.values()}
    stale = {g for g, m in existing.items() if (m["dataset"], m["cls"]) in classes and g not in groups}
    todo = [g for g in sorted(groups) if not _up_to_date(existing.get(g), settings, groups[g])]
    _check_settings(out, {g: m for g, m in existing.items() if g not in groups and g not in stale}, settings)
    pending = sorted(stale | set(todo))
    if pending and (out / INDEX).exists():  # keep the index readable: it lists complete groups only
        write_index(out, {g: m for g, m in existing.items() if g not in pending}, settings,
                    pending=[_identity(_marker_head(groups[g]) if g in groups else existing[g]) for g in pending])
    for g in sorted(stale):
        delete_group(out, existing[g])
    # No bar where stderr is no terminal (disable=None): logs and error lines stay clean.
    bar = tqdm(total=sum(len(groups[g]) for g in todo), desc="shard", unit="img", disable=None if progress else True)
    try:
        with ProcessPoolExecutor(max(1, workers)) as pool:
            for g in todo:
                if g in existing:
                    delete_group(out, existing[g])
                write_group(out, g, groups[g], opts, settings, pool, limit, max_count, bar)
    finally:
        bar.close()
    return write_index(out, read_groups(out), settings)


def group_records(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records by shard group; two (dataset, class, split) that give one group name are an error."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        g = group_name(r.dataset, r.cls, r.split)
        if groups[g] and _identity(_marker_head(groups[g])) != _identity(_marker_head([r])):
            raise ShardError(f"dataset '{r.dataset}' class '{r.cls}' split '{r.split}' and dataset "
                             f"'{groups[g][0].dataset}' class '{groups[g][0].cls}' split '{groups[g][0].split}' "
                             f"both become shard group '{g}'; rename one of them")
        groups[g].append(r)
    return dict(groups)


def _marker_head(recs: Sequence[Record]) -> dict:
    r0 = recs[0]
    return {"group": group_name(r0.dataset, r0.cls, r0.split), "dataset": r0.dataset, "cls": r0.cls,
            "split": r0.split, "domain": r0.domain}


def _identity(m: dict) -> dict:
    return {k: m[k] for k in ("group", "dataset", "cls", "split")}


def _check_same_identity(groups: dict[str, list[Record]], existing: dict[str, dict]) -> None:
    for g, recs in groups.items():
        if g in existing and _identity(existing[g]) != _identity(_marker_head(recs)):
            old, new = existing[g], recs[0]
            raise ShardError(f"dataset '{new.dataset}' class '{new.cls}' split '{new.split}' would become shard "
                             f"group '{g}', which already holds dataset '{old['dataset']}' class '{old['cls']}' "
                             f"split '{old['split']}'; rename one of them or shard into another folder")


def _up_to_date(marker: Optional[dict], settings: dict, recs: Sequence[Record]) -> bool:
    # The threshold decides the mask bytes: a re-conversion that changes only it rewrites the group
    # (markers of older versions lack it: their mask groups are rewritten once).
    return (bool(marker) and marker.get("settings") == settings and marker.get("keys") == [r.key for r in recs]
            and marker.get("mask_threshold") == mask_threshold_of(recs))


def _describe(settings: dict) -> str:
    size = settings.get("image_size")
    return (f"{'original size' if size is None else f'{size} px'}, {settings.get('image_format')}"
            + (f" quality {settings.get('quality')}" if settings.get("image_format") == "jpg" else "")
            + f", format version {settings.get('format_version')}")


def _check_settings(out: Path, kept: dict[str, dict], settings: dict) -> None:
    """Groups that stay must have this run's settings: one folder holds one image size and format."""
    for g, m in sorted(kept.items()):
        if m.get("settings") != settings:
            size = m.get("settings", {}).get("image_size")
            raise ShardError(
                f"{out}: holds shards written with {_describe(m.get('settings', {}))} (e.g. group {g}) and this run "
                f"asks for {_describe(settings)}; one shard folder holds one image size and format: shard into "
                f"another --out folder, or repeat the folder's settings (--size {size or 'original'} "
                f"--format {m.get('settings', {}).get('image_format')})")


def write_group(out: Path, g: str, recs: list[Record], opts: EncodeOptions, settings: dict,
                pool: ProcessPoolExecutor, limit: int, max_count: int, bar) -> dict:
    """Write one group's tars (temp names, renamed when complete), then its marker."""
    shards: list[dict] = []
    tar, tmp, final, written, count = None, None, None, 0, 0
    try:
        for rec, files in zip(recs, pool.map(encode_sample, recs, [opts] * len(recs), chunksize=8)):
            if tar is None:
                final = out / f"{g}-{len(shards):05d}.tar"
                tmp = temp_path(final)
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
                written, count = 0, 0
            written += _add(tar, rec.key, files)
            count += 1
            bar.update()
            if written >= limit or count >= max_count:
                shards.append(_close(tar, tmp, final, count))
                tar = None
        if tar is not None:
            shards.append(_close(tar, tmp, final, count))
            tar = None
    except BaseException:
        if tar is not None:
            tar.close()
            tmp.unlink(missing_ok=True)
        raise
    counts = {"normal": sum(1 for r in recs if not r.label), "anomalous": sum(1 for r in recs if r.label),
              "masks": sum(1 for r in recs if r.mask)}
    marker = {**_marker_head(recs), "shards": shards, "counts": counts, "mask_threshold": mask_threshold_of(recs),
              "settings": settings, "keys": [r.key for r in recs]}
    atomic_write_json(out / PROGRESS / f"{g}.json", marker)
    return marker


def _close(tar: tarfile.TarFile, tmp: Path, final: Path, count: int) -> dict:
    tar.close()
    os.replace(tmp, final)
    return {"name": final.name, "count": count, "bytes": final.stat().st_size}


# ------------------------------------------------------------------------------------------
# The folder: ownership, markers, index
# ------------------------------------------------------------------------------------------

def check_shard_folder(out: Path) -> None:
    """Refuse a folder zsadx did not write as shards (a shard folder of older zsadx is adopted)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ShardError(f"--out {out} is a file, not a folder; choose a new or empty --out folder")
    kind = owner_kind(out)
    if kind == OWNER_KIND or (kind is None and ((out / INDEX).is_file() or (out / PROGRESS).is_dir())):
        return
    if kind is not None:
        raise ShardError(f"{out}: zsadx wrote this folder as '{kind}', not as shards; choose another --out "
                         f"folder (e.g. {out / 'shards'})")
    # A writer that started at the same moment may be writing the ownership marker (a temp name).
    entries = sorted(p.name for p in out.iterdir() if not is_temp_name(p.name))
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ShardError(f"{out}: the folder exists and was not written by `zsadx data shard` (it holds {shown}); "
                         f"choose a new or empty --out folder")


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove temp files of killed runs (called with the lock held: no live writer owns them).

    Only names zsadx gives its temp files are removed: ``.<name>.tmp-<pid>-<id>`` tars, markers and
    indexes, and the ``<group>-NNNNN.tar.tmp`` / ``*.json.tmp`` names of older versions. The
    ownership marker is written before the lock is taken, so its temp file may belong to a writer
    that is just starting: that one is left while its process runs.
    """
    removed = []
    for folder in (out, out / PROGRESS):
        for p in folder.iterdir():
            ours = is_temp_name(p.name) and (".tar.tmp-" in p.name or ".json.tmp-" in p.name)
            if ours and p.name.startswith(f".{OWNER_FILE}.tmp-") and temp_writer_alive(p.name):
                continue
            legacy = _LEGACY_TEMP.fullmatch(p.name) or (folder.name == PROGRESS and p.name.endswith(".json.tmp"))
            if p.is_file() and (ours or legacy):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def read_groups(out: Path) -> dict[str, dict]:
    """Every complete group in ``out``: its marker in ``_progress/`` (the source of truth), else its
    entry in an index written by an older zsadx (with the index's settings and unknown keys)."""
    groups: dict[str, dict] = {}
    for p in sorted((out / PROGRESS).glob("*.json")):
        try:
            m = json.loads(p.read_text())
            groups[_valid_group(m, p)["group"]] = m
        except (ValueError, ShardError) as exc:
            log.warning("ignoring a broken progress marker %s (%s); its group is rewritten when sharded again",
                        p, exc)
    if (out / INDEX).is_file():
        try:
            index = load_index(out)
        except ShardError as exc:
            log.warning("%s; rebuilding it from the progress markers", exc)
            return groups
        settings = {k: index.get(k) for k in ("image_size", "image_format", "quality", "format_version")}
        for g in index["groups"]:
            groups.setdefault(g["group"], {**g, "settings": settings, "keys": None})
    return groups


def delete_group(out: Path, marker: dict) -> None:
    """Delete a group's tars -- only those its marker lists, inside ``out`` -- then its marker."""
    for s in marker.get("shards", []):
        name = safe_component(s["name"], f"{out / PROGRESS / (marker['group'] + '.json')}: shard name")
        resolve_within(out, name, "shard name").unlink(missing_ok=True)
    (out / PROGRESS / f"{safe_component(marker['group'], 'shard group')}.json").unlink(missing_ok=True)


def write_index(out: Path, groups: dict[str, dict], settings: dict, pending: Sequence[dict] = ()) -> dict:
    """Write ``index.json`` from the groups' markers (entries in group order: deterministic bytes).

    ``datasets`` records, per dataset, which classes the folder holds against its catalog; ``pending``
    (only while a run is writing, or after it was killed) the groups being rewritten.
    """
    from zsadx.data.convert.plugins import class_coverage

    entries = [{k: v for k, v in m.items() if k not in ("keys", "settings")} for _, m in sorted(groups.items())]
    held: dict[str, set] = defaultdict(set)
    for e in entries:
        held[e["dataset"]].add(e["cls"])
    index = {"format_version": FORMAT_VERSION, **settings, "groups": entries,
             "datasets": {d: class_coverage(d, classes) for d, classes in sorted(held.items())}}
    if pending:
        index["pending"] = list(pending)
    index["samples"] = sum(sum(s["count"] for s in g["shards"]) for g in entries)
    index["bytes"] = sum(sum(s["bytes"] for s in g["shards"]) for g in entries)
    atomic_write_text(out / INDEX, json.dumps(index, indent=1))
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
    """The folder's ``index.json``, checked; ``root`` is a folder or a remote root (module docstring)."""
    if is_remote(root):
        return _check_index(_read_remote_index(str(root)), member_location(root, INDEX), str(root))
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        hint = (" An interrupted `zsadx data shard` left it unfinished: run the same command again to resume."
                if (root / PROGRESS).is_dir() else " Create shards with `zsadx data shard MANIFEST --out DIR`.")
        raise ShardError(f"{path}: no shard index.{hint}")
    return _check_index(path.read_bytes(), str(path), str(root))


def _check_index(data: bytes, where: str, root: str) -> dict:
    rerun = f"re-run `zsadx data shard MANIFEST --out {root}` (finished groups are kept)"
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # truncated or garbled
        raise ShardError(f"{where}: not a readable shard index ({type(exc).__name__}: {exc}); {rerun}") from None
    if not isinstance(index, dict):
        raise ShardError(f"{where}: not a shard index (a JSON {type(index).__name__}); {rerun}")
    if index.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{where}: shard format version {index.get('format_version')} but this zsadx reads "
                         f"version {FORMAT_VERSION}. Re-shard with `zsadx data shard MANIFEST --out {root}`.")
    if index.get("image_format", "png") not in IMAGE_FORMATS:
        raise ShardError(f"{where}: images stored as {index.get('image_format')!r}, which this zsadx cannot read "
                         f"(it reads {', '.join(IMAGE_FORMATS)}): update zsadx or re-shard")
    if not isinstance(index.get("groups"), list):
        raise ShardError(f"{where}: shard index without a list of groups; {rerun}")
    for g in index["groups"]:
        _valid_group(g, where)
    return index


def _valid_group(g, path: Path | str) -> dict:
    """A group entry (index or progress marker) with the fields readers use, else a ShardError."""
    ok = (isinstance(g, dict) and all(isinstance(g.get(k), str) for k in ("group", "dataset", "cls", "split"))
          and isinstance(g.get("shards"), list)
          and all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int)
                  for s in g["shards"]))
    if not ok:
        raise ShardError(f"{path}: a broken group entry ({str(g)[:80]}); re-run `zsadx data shard` for its dataset")
    return g


def select_shards(root: str | os.PathLike, dataset: str | None = None, classes: Sequence[str] | None = None,
                  split: str | None = "test") -> list[ShardRef]:
    """The shards of the requested dataset / classes / split, from the index (nothing else is opened)."""
    from zsadx.config import suggest

    root = root if is_remote(root) else Path(root)
    index = load_index(root)
    groups = index["groups"]
    _refuse_pending(root, index, dataset, classes)
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
    return [ShardRef(member_location(root, s["name"]), s["count"], g["dataset"], g["cls"], g["split"])
            for g in groups for s in g["shards"]]


def shard_path(root: Path, name: str) -> Path:
    """``root / name`` for a shard name from the index; a name leading outside ``root`` is refused."""
    resolve_within(root, name, f"{root / INDEX}: shard name")
    return root / name


def _refuse_pending(root: Path, index: dict, dataset: str | None, classes: Sequence[str] | None) -> None:
    """Groups being rewritten (or whose run was killed) are not in the index: say so, not 'absent'."""
    pending = [p for p in index.get("pending", []) if isinstance(p, dict)
               and (dataset is None or p.get("dataset") == dataset) and (not classes or p.get("cls") in classes)]
    if pending:
        names = ", ".join(sorted({f"{p.get('dataset')}/{p.get('cls')}" for p in pending}))
        raise ShardError(f"{root}: {names} is being written by `zsadx data shard`, or that run was interrupted: "
                         f"wait for it, or run the same command again to finish it")


# ------------------------------------------------------------------------------------------
# Remote roots: http(s):// and pipe: (module docstring)
# ------------------------------------------------------------------------------------------

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
# What a remote shard name may hold: what zsadx writes (group names are [A-Za-z0-9_+-], then
# -NNNNN.tar). Anything else -- '/', '..', spaces, shell syntax -- is refused before it reaches
# a URL or a shell command.
_REMOTE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")
# curl's exit statuses in words (its own message, from stderr, follows them).
_CURL_EXIT = {6: "the host name does not resolve", 7: "connection refused: no server answers at that address",
              18: "the transfer ended early (truncated)", 22: "the server answered with an HTTP error",
              28: "timed out", 35: "the TLS handshake failed", 52: "the server sent nothing",
              56: "the connection broke while receiving"}
# Exit statuses of a reader whose output we stopped reading on purpose (SIGPIPE; curl's write error).
_STOPPED = (0, 141, -13)
_CURL_STOPPED = (23,)
# webdataset's gopen_curl arguments, with -S: curl's error line (e.g. "returned error: 404") is kept.
_CURL = ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-sS", "-L"]


def is_remote(root: str | os.PathLike) -> bool:
    """An http(s):// or pipe: shard root (a local path is a Path, or a str without those prefixes)."""
    return isinstance(root, str) and root.startswith(REMOTE_PREFIXES)


def member_location(root: str | os.PathLike, name: str) -> str:
    """Where file ``name`` of the shard root lies: a local path, a URL or a pipe: command."""
    if not is_remote(root):
        return str(shard_path(Path(root), name))
    if not _REMOTE_NAME.fullmatch(name) or set(name) == {"."}:
        raise UnsafePathError(f"{root}: shard name {name!r} from the remote index is not a plain file name "
                              f"(letters, digits, '.', '_', '+', '-'); refusing to fetch it")
    if root.startswith("pipe:"):
        if "{name}" not in root:
            raise ShardError(f"{root}: a pipe: shard root needs '{{name}}' where the file name goes, e.g. "
                             f"'pipe:cat /data/shards/{{name}}' or 'pipe:aws s3 cp s3://bucket/shards/{{name}} -'")
        return root.replace("{name}", shlex.quote(name))
    return root.rstrip("/") + "/" + urllib.parse.quote(name)


def open_member(location: str) -> IO[bytes]:
    """A binary stream of a local file, a URL or a pipe: command's output (streamed, never saved).

    Remote streams are webdataset's :class:`~webdataset.gopen.Pipe`, what its ``gopen`` returns for
    http(s) (its curl command, plus ``-S``) and pipe: (a shell), built here so that the reader's
    stderr goes to a temporary file (not a pipe: a chatty command cannot block on it) and a
    failure can quote the reader's own words.
    """
    if not is_remote(location):
        return open(location, "rb")
    from webdataset import utils as wds_utils
    from webdataset.gopen import Pipe

    http = not location.startswith("pipe:")
    if not http and wds_utils.enforce_security:  # webdataset's switch against running commands
        raise ShardError(f"{location}: pipe: shard roots are turned off here (WDS_SECURE=1 forbids running "
                         f"commands); use a local folder or an http(s):// root")
    err = tempfile.TemporaryFile()
    try:
        stream = Pipe(_CURL + [location] if http else location[len("pipe:"):], mode="rb", shell=not http,
                      stderr=err, bufsize=1 << 20, ignore_status=[141, 23] if http else [141])
    except OSError as exc:  # curl or the shell is missing
        err.close()
        raise ShardError(f"{location}: cannot start its reader ({exc})") from exc
    stream.stderr_file = err
    return stream


def finish_member(stream: IO[bytes], location: str) -> Optional[str]:
    """Close a stream of :func:`open_member`; for a remote one, why its transfer or command failed
    (None when it did not, or when it only stopped because we stopped reading)."""
    proc = getattr(stream, "proc", None)  # webdataset's Pipe: curl, or the pipe: command
    if proc is None:
        stream.close()
        return None
    # Our end first: a reader still writing then stops (SIGPIPE) instead of blocking on a full pipe.
    stream.stream.close()
    try:
        status = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = None
    said = _last_line(stream.stderr_file)
    curl = location.startswith(("http://", "https://"))
    if status in _STOPPED or (curl and status in _CURL_STOPPED):
        return None
    if status is None:
        return "its reader did not end within 60 s after reading stopped"
    what = (_CURL_EXIT.get(status, f"curl failed (exit status {status})") if curl
            else f"the command failed (exit status {status})")
    return f"{what} ({said})" if said else what


def _last_line(err: IO[bytes]) -> str:
    """The last line the reader wrote to stderr (at most 300 characters), and the file closed."""
    err.seek(0)
    lines = [line.strip() for line in err.read()[-4096:].decode("utf-8", "replace").splitlines() if line.strip()]
    err.close()
    return lines[-1][:300] if lines else ""


def _read_remote_index(root: str) -> bytes:
    location = member_location(root, INDEX)
    stream = open_member(location)
    try:
        data = stream.read()
    except OSError:  # the Pipe saw a failed exit status; finish_member says which
        data = b""
    failure = finish_member(stream, location)
    if failure:
        raise ShardError(f"{location}: no shard index: {failure}")
    return data


def iter_tar(path: str, skip_errors: bool = False) -> Iterator[dict[str, bytes]]:
    """Samples of one tar (a local file, a URL or a pipe: command) as {'__key__': key, ext: bytes};
    a broken tar or transfer raises naming the shard (URL) and the last key."""
    key, sample, done = None, {}, False
    try:
        stream = open_member(path)
    except OSError as exc:
        raise ShardError(f"{path}: cannot open the shard ({exc}). Re-create it with `zsadx data shard`.") from exc
    try:
        try:
            # A local file is read with seeks (tarfile's stream mode copies its buffer on every
            # header: 3x slower for raw shards); a remote stream can only be read in order.
            with tarfile.open(fileobj=stream, mode="r|" if is_remote(path) else "r:") as tar:
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
                    sample[ext] = _read_member(tar, member, None if is_remote(path) else stream)
        except (tarfile.TarError, OSError, EOFError) as exc:
            done = True
            failure = finish_member(stream, path)
            if failure:  # the transfer failed: that, not the tar it cut short, is the news
                raise ShardError(f"{path}: {failure} (near sample key '{key}')") from exc
            raise ShardError(f"{path}: corrupt or truncated shard near sample key '{key}' ({exc}). "
                             "Re-create it with `zsadx data shard`.") from exc
        done = True
        failure = finish_member(stream, path)
        if failure:
            raise ShardError(f"{path}: {failure} (after sample key '{key}')")
    finally:
        if not done:  # the consumer stopped early (a slice ends inside this shard)
            finish_member(stream, path)
    if sample:
        yield sample


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, local: IO[bytes] | None) -> bytearray:
    """A member's bytes in a writable buffer (raw pixels become tensors without a copy or a
    read-only warning); from a local file read straight into it, at the member's offset."""
    data = bytearray(member.size)
    if local is not None and not member.issparse():
        local.seek(member.offset_data)
        got = local.readinto(data)
    else:
        got = tar.extractfile(member).readinto(data)
    if got != member.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def add_parser(dsub) -> None:
    p = dsub.add_parser("shard", help="manifest -> WebDataset shards + index.json (resumable)")
    p.add_argument("manifest", help="manifest.jsonl or the folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="518", help="stored image side in px, or 'original'")
    p.add_argument("--shard-size", default="256MB")
    p.add_argument("--format", default="png", choices=list(IMAGE_FORMATS),
                   help="png/webp: lossless, compressed; jpg: lossy (--quality); raw: lossless uncompressed uint8 "
                        "(~3x the bytes of png, decoded by a copy: the fastest to read)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (jpg only)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--wait-lock", action="store_true",
                   help="wait while another `zsadx data shard` writes into --out (default: refuse)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    size = None if args.size == "original" else int(args.size)
    index = write_shards(args.manifest, args.out, size=size, shard_size=args.shard_size, fmt=args.format,
                         quality=args.quality, workers=args.workers, wait_lock=args.wait_lock)
    n_shards = sum(len(g["shards"]) for g in index["groups"])
    print(f"{index['samples']} samples in {n_shards} shards ({index['bytes'] / 1e6:.1f} MB) "
          f"under {args.out}, {len(index['groups'])} groups (dataset x class x split)")
    return 0
