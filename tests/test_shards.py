"""Shards: writer, index, exactly-once evaluation, the training mixture, integrity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from zsadx.data.convert import convert
from zsadx.data.loaders import EvalShards, MixtureSource, TrainMixture
from zsadx.data.records import read_manifest
from zsadx.data.shards import ShardError, load_index, select_shards, write_shards
from zsadx.data.synthetic import make_raw
from zsadx.data.transforms import EvalTransform

T = EvalTransform(size=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """MVTec-style (15 classes) + Kvasir (1 class) + BMAD liver, converted and sharded at 32 px."""
    base = tmp_path_factory.mktemp("shards")
    manifests = []
    for name, n in (("mvtec-ad", 2), ("kvasir", 4), ("bmad-liver", 2)):
        make_raw(name, base / "raw" / name, seed=0, n=n)
        convert(name, base / "raw" / name, base / "m" / name, progress=False)
        manifests.append(base / "m" / name / "manifest.jsonl")
    merged = base / "all.jsonl"
    merged.write_text("".join(Path(m).read_text() for m in manifests))
    # Small shards so that one class spans several of them.
    write_shards(merged, base / "s", size=32, shard_size="6KB", progress=False)
    return base


def eval_keys(root, world, workers, **sel):
    keys = []
    for rank in range(world):
        ds = EvalShards(root, transform=T, rank=rank, world_size=world, **sel)
        batches = list(DataLoader(ds, batch_size=4, num_workers=workers))
        got = [k for b in batches for k in b["key"]]
        assert len(got) == ds.rank_count(rank, world)
        # The per-class counts the evaluator sizes its metric state from, before reading anything.
        assert ds.rank_class_counts(rank, world) == Counter(c for b in batches for c in b["cls"])
        keys += got
    return keys


def test_index_groups_and_counts(shards):
    index = load_index(shards / "s")
    recs = read_manifest(shards / "all.jsonl")
    assert index["samples"] == len(recs)
    groups = {(g["dataset"], g["cls"], g["split"]) for g in index["groups"]}
    assert ("mvtec-ad", "bottle", "test") in groups and ("bmad-liver", "liver", "valid") in groups
    kv = [g for g in index["groups"] if g["dataset"] == "kvasir"][0]
    assert len(kv["shards"]) > 1 and kv["counts"] == {"normal": 0, "anomalous": 12, "masks": 12}
    # A class is read from its own shards only.
    refs = select_shards(shards / "s", "mvtec-ad", ["bottle"], "test")
    assert refs and all("bottle-test" in r.path for r in refs)
    with pytest.raises(ShardError, match="did you mean 'kvasir'"):
        select_shards(shards / "s", "kvasr")


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 2), (3, 2)])
def test_eval_exactly_once(shards, world, workers):
    recs = read_manifest(shards / "all.jsonl")
    want = sorted(r.key for r in recs if r.dataset == "mvtec-ad" and r.split == "test")
    keys = eval_keys(shards / "s", world, workers, dataset="mvtec-ad")
    assert sorted(keys) == want  # every sample once: no loss, no duplicates


def test_eval_exactly_once_with_fewer_shards_than_consumers(shards):
    refs = select_shards(shards / "s", "mvtec-ad", ["bottle"], "test")
    assert len(refs) < 2 * 2
    keys = eval_keys(shards / "s", 2, 2, dataset="mvtec-ad", classes=["bottle"])
    want = [r.key for r in read_manifest(shards / "all.jsonl") if r.cls == "bottle" and r.split == "test"]
    assert sorted(keys) == sorted(want)


def test_eval_exactly_once_under_torch_distributed(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "dist_eval_worker.py"), str(shards / "s"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    k0, k1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    want = [r.key for r in read_manifest(shards / "all.jsonl") if r.dataset == "kvasir"]
    assert sorted(k0 + k1) == sorted(want) and not set(k0) & set(k1)


def test_masks_and_images_decode_consistently(shards):
    batch = next(iter(DataLoader(EvalShards(shards / "s", dataset="kvasir", transform=T), batch_size=12)))
    assert batch["image"].shape == (12, 3, 32, 32) and batch["image"].dtype == torch.uint8  # normalised on the device
    assert batch["mask"].shape == (12, 32, 32) and batch["mask"].dtype == torch.uint8
    assert set(batch["mask"].unique().tolist()) <= {0, 1} and (batch["mask"].flatten(1).sum(1) > 0).all()
    near = next(iter(DataLoader(EvalShards(shards / "s", dataset="kvasir",
                                           transform=EvalTransform(size=32, mask_resize="nearest")), batch_size=12)))
    # The two resize rules differ only along the defect's border.
    diff = (near["mask"] != batch["mask"]).float().mean()
    assert 0 <= diff < 0.05
    normal = next(iter(DataLoader(EvalShards(shards / "s", dataset="mvtec-ad", split="train", transform=T),
                                  batch_size=4)))
    assert normal["mask"].sum() == 0 and normal["label"].sum() == 0


def test_train_mixture_proportions_batches_and_determinism(shards):
    sources = [MixtureSource(str(shards / "s"), "mvtec-ad", "test", weight=3.0),
               MixtureSource(str(shards / "s"), "kvasir", "test", weight=1.0)]
    counts, per_rank = Counter(), []
    for rank in range(2):
        ds = TrainMixture(sources, batch_size=8, batches_per_epoch=15, transform=T, seed=1, shuffle_buffer=16,
                          rank=rank, world_size=2)
        batches = list(DataLoader(ds, batch_size=None, num_workers=2))
        per_rank.append(len(batches))
        for b in batches:
            assert b["image"].shape == (8, 3, 32, 32)
            counts.update(b["dataset"])
    assert per_rank == [15, 15]
    frac = counts["mvtec-ad"] / sum(counts.values())
    assert abs(frac - 0.75) < 0.08, frac
    ds = TrainMixture(sources, batch_size=4, batches_per_epoch=5, transform=T, seed=1, rank=0, world_size=1)
    a = [b["key"] for b in DataLoader(ds, batch_size=None, num_workers=2)]
    b = [b["key"] for b in DataLoader(ds, batch_size=None, num_workers=2)]
    assert a == b  # same seed and epoch -> same stream
    ds.set_epoch(1)
    c = [b["key"] for b in DataLoader(ds, batch_size=None, num_workers=2)]
    assert c != a
    other_rank = TrainMixture(sources, batch_size=4, batches_per_epoch=5, transform=T, seed=1, rank=1,
                              world_size=2)
    assert [b["key"] for b in DataLoader(other_rank, batch_size=None)] != a


def _corrupt_copy(shards, tmp_path, how):
    import shutil

    dst = tmp_path / "s"
    shutil.copytree(shards / "s", dst)
    ref = select_shards(dst, "kvasir")[0]
    data = Path(ref.path).read_bytes()
    if how == "truncate":
        Path(ref.path).write_bytes(data[: len(data) // 2 + 100])
    else:  # garble the image bytes of the first sample (the PNG signature stays, the data not)
        i = data.find(b"IDAT")
        Path(ref.path).write_bytes(data[:i + 8] + b"\x00" * 200 + data[i + 208:])
    return dst, ref


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_corrupt_shard_names_shard_and_key(shards, tmp_path, how):
    dst, ref = _corrupt_copy(shards, tmp_path, how)
    with pytest.raises(ShardError) as err:
        list(DataLoader(EvalShards(dst, dataset="kvasir", transform=T), batch_size=4))
    msg = str(err.value)
    assert Path(ref.path).name in msg and ("sample key" in msg or "corrupt sample" in msg or "truncated" in msg)


def test_training_skips_corrupt_samples_up_to_a_limit(shards, tmp_path):
    dst, _ = _corrupt_copy(shards, tmp_path, "garble")
    src = [MixtureSource(str(dst), "kvasir")]
    ds = TrainMixture(src, batch_size=4, batches_per_epoch=6, transform=T, shuffle_buffer=4, max_skips=1000)
    assert len(list(DataLoader(ds, batch_size=None))) == 6
    assert ds.skipped > 0
    strict = TrainMixture(src, batch_size=4, batches_per_epoch=50, transform=T, shuffle_buffer=4, max_skips=0)
    with pytest.raises(ShardError, match="more than 0 corrupt"):
        list(DataLoader(strict, batch_size=None))


def test_interrupted_write_is_detected_and_resumed(shards, tmp_path, monkeypatch):
    from zsadx.data import shards as mod

    calls = {"n": 0}
    real = mod._add

    def dying_add(*a, **k):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mod, "_add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        write_shards(shards / "all.jsonl", tmp_path / "s", size=32, shard_size="6KB", progress=False, workers=1)
    with pytest.raises(ShardError, match="interrupted.*run the same command again"):
        load_index(tmp_path / "s")
    done_before = {p.name for p in (tmp_path / "s" / "_progress").iterdir()}
    monkeypatch.setattr(mod, "_add", real)
    written = []
    monkeypatch.setattr(mod, "_add", lambda tar, key, files: written.append(key) or real(tar, key, files))
    index = write_shards(shards / "all.jsonl", tmp_path / "s", size=32, shard_size="6KB", progress=False, workers=1)
    assert index["samples"] == len(read_manifest(shards / "all.jsonl"))
    assert len(written) < index["samples"]  # finished groups were not rewritten
    assert done_before and not list((tmp_path / "s").glob("*.tmp"))
    assert sorted(eval_keys(tmp_path / "s", 1, 0, split=None)) == sorted(r.key for r in read_manifest(shards / "all.jsonl"))


def test_format_version_mismatch_says_how_to_reshard(shards, tmp_path):
    import shutil

    shutil.copytree(shards / "s", tmp_path / "s")
    idx = json.loads((tmp_path / "s" / "index.json").read_text())
    idx["format_version"] = 0
    (tmp_path / "s" / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="version 0.*Re-shard with `zsadx data shard"):
        EvalShards(tmp_path / "s")
