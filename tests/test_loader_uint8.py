"""Issue 19 goal 3: the loaders yield uint8 images (normalised on the device, to the same values as
the CPU float path), and the raw shard format gives exactly the tensors of PNG shards."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import make_shards, run_cli
from zsadx.data.loaders import EvalShards, MixtureSource, TrainMixture, decode_sample
from zsadx.data.shards import ShardError, encode_raw, iter_tar, load_index, select_shards, write_shards
from zsadx.data.transforms import EvalTransform, normalise
from zsadx.models.backbone import OPENAI_MEAN, OPENAI_STD

SIZE = 40
DATASETS = {"mvtec-ad": 1, "kvasir": 3}


@pytest.fixture(scope="module")
def png_and_raw(tmp_path_factory):
    """The same images sharded as PNG and as raw (via the CLI)."""
    base = tmp_path_factory.mktemp("uint8")
    png = make_shards(base, DATASETS, size=SIZE)
    raw = base / "raw-shards"
    write_shards(base / "manifest.jsonl", raw, size=SIZE, fmt="raw", progress=False)
    return png, raw


def batches(root, dataset, transform, workers=0, split="test"):
    ds = EvalShards(root, dataset, split=split, transform=transform)
    return list(DataLoader(ds, batch_size=5, num_workers=workers))


def stored_png_images(root, dataset) -> dict[str, Image.Image]:
    out = {}
    for ref in select_shards(root, dataset):
        for sample in iter_tar(ref.path):
            with Image.open(io.BytesIO(sample["img.png"])) as im:
                im.load()
            out[json.loads(sample["json"])["key"]] = im
    return out


def test_loader_yields_uint8_that_normalises_to_the_float_path(png_and_raw):
    """normalise(uint8 batch) equals EvalTransform.image of the stored image (the CPU float path) and
    an independent float64 re-expression of (v / 255 - mean) / std. Tolerance: both float32 paths
    round each of 2 operations once (|x| < 2.2, eps 1.2e-7): a few ulp."""
    png, _ = png_and_raw
    t = EvalTransform(size=SIZE)
    stored = stored_png_images(png, "kvasir")
    for batch in batches(png, "kvasir", t):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, SIZE, SIZE)
        assert batch["mask"].dtype == torch.uint8
        got = normalise(batch["image"])
        assert got.dtype == torch.float32
        for i, key in enumerate(batch["key"]):
            cpu = t.image(stored[key])
            torch.testing.assert_close(got[i], cpu, rtol=1e-6, atol=1e-6)
            v = np.asarray(stored[key], dtype=np.float64).transpose(2, 0, 1)
            ref = (v / 255.0 - np.array(OPENAI_MEAN)[:, None, None]) / np.array(OPENAI_STD)[:, None, None]
            np.testing.assert_allclose(got[i].numpy(), ref, rtol=1e-6, atol=1e-6)


def test_workers_stack_the_same_uint8_batches(png_and_raw):
    """Batches stacked in DataLoader workers (straight into shared memory) equal those stacked in
    the main process; the training mixture's batches are uint8 too."""
    png, _ = png_and_raw
    t = EvalTransform(size=SIZE)
    main, workers = batches(png, "kvasir", t), batches(png, "kvasir", t, workers=2)
    keyed = lambda bs: {k: (b["image"][i], b["mask"][i]) for b in bs for i, k in enumerate(b["key"])}  # noqa: E731
    a, b = keyed(main), keyed(workers)
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    mix = TrainMixture([MixtureSource(str(png), "kvasir")], batch_size=4, batches_per_epoch=2, transform=t, seed=0)
    got = list(DataLoader(mix, batch_size=None, num_workers=1))
    assert len(got) == 2 and all(g["image"].dtype == torch.uint8 and g["image"].shape == (4, 3, SIZE, SIZE)
                                 for g in got)


@pytest.mark.parametrize("mask_resize,mask_size", [("bilinear", None), ("nearest", None), ("bilinear", 24)])
def test_raw_shards_give_exactly_the_png_tensors(png_and_raw, mask_resize, mask_size):
    png, raw = png_and_raw
    t = EvalTransform(size=SIZE, mask_resize=mask_resize, mask_size=mask_size)
    for dataset, split in (("kvasir", "test"), ("mvtec-ad", "test"), ("mvtec-ad", "train")):
        a, b = batches(png, dataset, t, split=split), batches(raw, dataset, t, split=split)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x["key"] == y["key"] and torch.equal(x["label"], y["label"])
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def test_raw_shards_store_npy_members_and_say_so_in_the_index(png_and_raw, tmp_path, capsys):
    png, raw = png_and_raw
    assert load_index(raw)["image_format"] == "raw" and load_index(png)["image_format"] == "png"
    sample = next(s for r in select_shards(raw, "kvasir") for s in iter_tar(r.path))
    assert {"img.npy", "mask.npy", "maskn.npy", "json"} <= set(sample)
    # The CLI spelling writes the same folder.
    rc, _, err = run_cli(capsys, "data", "shard", png.parent / "manifest.jsonl", "--out", tmp_path / "s",
                         "--size", SIZE, "--format", "raw")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar")) == sorted(p.name for p in raw.glob("*.tar"))
    assert all((tmp_path / "s" / p.name).read_bytes() == p.read_bytes() for p in raw.glob("*.tar"))


def npy_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def hostile_header(shape: tuple) -> bytes:
    """A .npy header claiming ``shape`` followed by a few bytes: np.load would allocate it all."""
    good = encode_raw(np.zeros((3, 2, 2), np.uint8))
    return good.replace(b"(3, 2, 2)", repr(shape).encode(), 1)[:200]


@pytest.mark.parametrize("member,why", [
    (npy_bytes(np.zeros((3, 4, 4), np.float64)), "expected uint8"),
    (npy_bytes(np.zeros((4, 4), np.uint8)), "expected uint8"),
    (npy_bytes(np.zeros((4, 4, 3), np.uint8)), r"expected uint8 \(3, H, W\)"),
    (npy_bytes(np.array([{"x": 1}], dtype=object), allow_pickle=True), "expected uint8"),
    (npy_bytes(np.asfortranarray(np.zeros((3, 4, 5), np.uint8))), "Fortran"),
    (encode_raw(np.zeros((3, 4, 4), np.uint8))[:-7], "bytes of pixels"),
    (hostile_header((3, 100000, 100000)), "pixel limit"),
    (b"\x89PNG not an npy", "not a zsadx raw member"),
], ids=["float64", "grey", "channels-last", "pickle", "fortran", "short", "huge", "not-npy"])
def test_a_broken_raw_member_is_a_corrupt_sample_naming_its_key(member, why):
    sample = {"__key__": "k1", "json": json.dumps({"label": 0, "cls": "c", "dataset": "d", "domain": "x",
                                                    "key": "k1", "has_mask": False}).encode(), "img.npy": member}
    with pytest.raises(ShardError, match=f"s.tar: corrupt sample 'k1' .*{why}"):
        decode_sample(sample, EvalTransform(size=4), "s.tar")


def test_raw_at_original_size_is_resized_by_the_transform(tmp_path):
    """A raw member of another size than the model's goes through the same bicubic resize as PNG."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    meta = json.dumps({"label": 0, "cls": "c", "dataset": "d", "domain": "x", "key": "k", "has_mask": False}).encode()
    t = EvalTransform(size=16)
    from_raw = decode_sample({"json": meta, "img.npy": encode_raw(pixels.transpose(2, 0, 1))}, t)["image"]
    from_png = decode_sample({"json": meta, "img.png": png.getvalue()}, t)["image"]
    assert from_raw.shape == (3, 16, 16) and torch.equal(from_raw, from_png)


def test_a_shard_tar_member_is_read_into_a_writable_buffer(png_and_raw):
    """Raw pixels become tensors without a copy: the tar members come back writable."""
    _, raw = png_and_raw
    ref = select_shards(raw, "kvasir")[0]
    sample = next(iter_tar(ref.path))
    assert isinstance(sample["img.npy"], bytearray)
    with tarfile.open(ref.path) as tar:
        assert tar.extractfile(f"{sample['__key__']}.img.npy").read() == bytes(sample["img.npy"])


def test_data_benchmark_prints_every_format_beside_the_bound(capsys):
    """benchmarks/data.py runs (a few tiny images): one row per format, the bound, before and folder."""
    from test_bench_smoke import bench_module

    bench_module("data").main(["--images", "4", "--native", "48", "--size", "32", "--workers", "1",
                               "--repeats", "1"])
    printed = capsys.readouterr().out
    for row in ("decode bound", "shards png (uint8)", "shards webp (uint8)", "shards jpg (uint8)",
                "shards raw (uint8)", "float in workers (before)", "folder of PNG", "collate"):
        assert row in printed, row


# --- libspng (`zsadx[fast-png]`): the faster PNG decoder gives Pillow's pixels ---------------------

@pytest.mark.parametrize("rule", ["bilinear", "nearest"])
@pytest.mark.parametrize("mask_size", [None, SIZE // 2 + 1])   # the stored masks as they are, and resized
def test_libspng_and_pillow_decode_the_same_pixels_and_masks(png_and_raw, monkeypatch, rule, mask_size):
    from zsadx.data import loaders

    if loaders._spng is None:
        pytest.skip("pyspng is not installed (pip install zsadx[fast-png])")
    t = EvalTransform(size=SIZE, mask_resize=rule, mask_size=mask_size)
    fast = {ds: batches(png_and_raw[0], ds, t) for ds in DATASETS}
    monkeypatch.setattr(loaders, "_spng", None)
    for ds, pillow in ((ds, batches(png_and_raw[0], ds, t)) for ds in DATASETS):
        assert len(pillow) == len(fast[ds]) > 0
        for x, y in zip(fast[ds], pillow):
            assert x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def test_a_corrupt_png_is_a_corrupt_sample_with_either_decoder(png_and_raw, monkeypatch):
    from zsadx.data import loaders

    sample = dict(next(s for r in select_shards(png_and_raw[0], "kvasir") for s in iter_tar(r.path)))
    sample["img.png"] = bytes(sample["img.png"])[:200]  # cut off: a truncated download
    for decoder in (loaders._spng, None):
        monkeypatch.setattr(loaders, "_spng", decoder)
        with pytest.raises(ShardError, match=f"s.tar: corrupt sample '{sample['__key__']}'"):
            decode_sample(sample, EvalTransform(size=SIZE), "s.tar")


def test_a_corrupt_mask_is_a_corrupt_sample_with_either_decoder(png_and_raw, monkeypatch):
    from zsadx.data import loaders

    sample = dict(next(s for r in select_shards(png_and_raw[0], "kvasir") for s in iter_tar(r.path)
                       if "mask.png" in s))
    for member in ("mask.png", "maskn.png"):
        broken = {**sample, member: b"\x89PNG\r\n\x1a\n" + bytes(40)}  # a PNG signature, then nothing valid
        rule = "bilinear" if member == "mask.png" else "nearest"
        for decoder in (loaders._spng, None):
            monkeypatch.setattr(loaders, "_spng", decoder)
            with pytest.raises(ShardError, match=f"s.tar: corrupt sample '{sample['__key__']}'"):
                decode_sample(broken, EvalTransform(size=SIZE, mask_resize=rule), "s.tar")
