"""Manifest records: one JSON line per image, the common form of every dataset after conversion."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from zsadx.files import hash_file

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"


@dataclass
class Record:
    """One image of a converted dataset.

    ``key`` is unique within the dataset and stable across machines (it is built from the path in
    the raw download), so shards, results and few-shot reference lists can name images by it.
    ``label`` is 1 for anomalous. ``mask`` is None for normal images and for datasets without pixel
    ground truth; a mask pixel is anomalous where its grey value is above ``mask_threshold`` (0 unless
    the dataset or ``zsadx data convert --mask-threshold`` says otherwise, e.g. 127 for TN3K's JPEG masks).
    """

    key: str
    image: str
    label: int
    cls: str
    dataset: str
    domain: str
    split: str
    mask: Optional[str] = None
    specie: str = ""
    width: int = 0
    height: int = 0
    source: str = ""
    sha1: str = ""
    mask_sha1: str = ""
    mask_threshold: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def mask_threshold_of(records: Iterable[Record]) -> Optional[Union[int, list]]:
    """The threshold the masks of ``records`` are cut at: one value, a sorted list if several, None
    without masks. Shard markers and the index carry it, so a changed threshold rewrites a group."""
    values = sorted({r.mask_threshold for r in records if r.mask})
    return None if not values else values[0] if len(values) == 1 else values


def file_sha1(path: str | os.PathLike) -> str:
    return hash_file(path, algorithm="sha1").hexdigest()


def write_manifest(records: Iterable[Record], path: str | os.PathLike) -> int:
    n = 0
    with open(path, "w") as f:
        for r in records:
            f.write(r.to_json() + "\n")
            n += 1
    return n


def read_manifest(path: str | os.PathLike) -> list[Record]:
    """Read a manifest; a broken line is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (create it with `zsadx data convert`)")
    fields = {f.name for f in dataclasses.fields(Record)}
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                unknown = set(data) - fields
                if unknown:
                    raise ValueError(f"unknown fields {sorted(unknown)}")
                out.append(Record(**data))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{i}: not a manifest record ({exc})") from exc
    return out


def iter_manifest(path: str | os.PathLike) -> Iterator[Record]:
    yield from read_manifest(path)
