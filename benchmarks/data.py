"""Decoded 518 px images/s per core: zsadx shards in each format vs the decode-only bound, the
loader as it was (float normalisation in the workers) and a seed-style folder-of-PNG loader.

One run prints all of it (issue 19 goal 3):

* ``decode bound``: PIL (and libspng, when installed) decoding PNG bytes in a loop (no tar, no
  tensors) -- what a PNG loader cannot beat on one core -- for the shards' own PNGs
  (:mod:`zsadx.data.png`: filter Up, zlib RLE) and for the same images as Pillow writes them
  (level 1, adaptive filters: the usual PNG, and zsadx's shards before);
* ``shards <fmt>``: :class:`EvalShards` in this process (one core: tar reading, decoding, the uint8
  tensor, the mask), for png, webp (lossless), jpg (lossy) and raw (uncompressed uint8);
* ``shards png Pillow-written (before)``: the loader on shards whose PNGs Pillow wrote;
* ``shards png, float in workers (before)``: that, with the per-sample float32 normalisation before it;
* ``folder of PNG (seed-style)``: what the seeds' datasets do per item -- decode the native-size PNG,
  resize bicubically to 518, ToTensor + normalise, mask open + resize;
* the same through a torch DataLoader with ``--workers`` workers (total and per worker), and what a
  batch costs to collate and to pin in uint8 and in float32.

"per core" is images per CPU second (of this process and, through a DataLoader, of its workers):
the per-core rate, which other work on a shared machine disturbs far less than wall-clock images/s.
Images are synthetic at MVTec-like native size (default 900 px), half anomalous. The machine is
shared: figures are noisy, compare the columns of one run.

    python benchmarks/data.py [--images 120] [--native 900] [--workers 2] [--passes 4]
"""
from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset

from zsadx.data import loaders, shards
from zsadx.data.loaders import EvalShards, collate
from zsadx.data.records import Record, write_manifest
from zsadx.data.shards import iter_tar, select_shards, write_shards
from zsadx.data.synthetic import sample, save, save_mask
from zsadx.data.transforms import EvalTransform

FORMATS = ("png", "webp", "jpg", "raw")


class FolderLoader(Dataset):
    """The seeds' per-file path: decode the full-size PNG and resize on every read."""

    def __init__(self, records: list[Record], size: int = 518):
        self.records, self.t = records, EvalTransform(size=size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        with Image.open(r.image) as im:
            image = self.t.image(im)
        mask = self.t.mask(Image.open(r.mask)) if r.mask else self.t.mask(None)
        return {"image": image, "mask": mask, "label": r.label}


class FloatInWorkers(EvalTransform):
    """The loader before issue 19: each sample normalised to float32 where it is decoded."""

    def pixels(self, im):
        return self.image(im)


def make_set(folder: Path, n: int, native: int) -> list[Record]:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        img, mask = sample(native, native, rng, anomalous=i % 2 == 1)
        p = save(folder / f"{i:04d}.png", img)
        m = save_mask(folder / f"{i:04d}_mask.png", mask) if i % 2 else None
        recs.append(Record(key=f"{i:04d}", image=str(p), label=i % 2, cls="bench", dataset="bench",
                           domain="industrial", split="test", mask=str(m) if m else None, width=native,
                           height=native))
    return recs


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of its finished children (DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def rate(batches, fixed_cpu: float = 0.0) -> tuple[float, float, float]:
    """(images per wall second, per CPU second, per CPU second of the child processes alone): the
    per-CPU-second rate is the per-core rate, and it is what a busy shared machine disturbs least
    (other work takes wall time, not our CPU time); the third is a DataLoader's per worker core.
    ``fixed_cpu``: the children's CPU seconds of a pass that are not per image (worker start-up)."""
    wall, (me, kids), n = time.perf_counter(), cpu_seconds(), 0
    for batch in batches:
        n += batch["image"].shape[0]
    del batches  # DataLoader workers end here, so their CPU time is counted
    wall, (me2, kids2) = time.perf_counter() - wall, cpu_seconds()
    children = max(kids2 - kids - fixed_cpu, 1e-9)
    return n / wall, n / max(me2 - me + children, 1e-9), n / children


def best_rates(make, repeats: int, fixed_cpu: float = 0.0) -> tuple[float, float, float]:
    """Each figure of :func:`rate` at its best of ``repeats`` passes (the first also warms the page
    cache): the least disturbed by the other work on a shared machine."""
    rates = [rate(make(), fixed_cpu) for _ in range(repeats)]
    return tuple(max(r[i] for r in rates) for i in range(3))


def best_rate(make, repeats: int, fixed_cpu: float = 0.0) -> tuple[float, float]:
    """(images per wall second, per core) of :func:`best_rates`: one process, no workers."""
    return best_rates(make, repeats, fixed_cpu)[:2]


class Passes(IterableDataset):
    """The shards ``times`` over in one DataLoader pass: each worker decodes as many images as it
    would for a class of ``times`` x the benchmark's images, so the figures are the steady rate,
    not a fresh worker's first few dozen images (its caches and allocator still cold)."""

    def __init__(self, inner: IterableDataset, times: int):
        self.inner, self.times = inner, times

    def __iter__(self):
        for _ in range(self.times):
            yield from self.inner


class Nothing(IterableDataset):
    def __iter__(self):
        return iter(())


def worker_startup_cpu(workers: int, repeats: int = 3) -> float:
    """CPU seconds a DataLoader pass costs before its first sample (forking and ending the workers):
    paid once per pass, so over a real dataset's thousands of images it vanishes."""
    cpu = sum(cpu_seconds())
    for _ in range(repeats):
        list(DataLoader(Nothing(), num_workers=workers))
    return (sum(cpu_seconds()) - cpu) / repeats


@contextmanager
def png_decoder(spng: bool):
    """The loaders' PNG decoder for a measurement: libspng (when installed) or Pillow. Set before
    DataLoader workers fork, so they inherit it."""
    saved = loaders._spng
    loaders._spng = saved if spng else None
    try:
        yield
    finally:
        loaders._spng = saved


def pillow_written(data: bytes) -> bytes:
    """The same image as Pillow writes a PNG (level 1, its adaptive filters): the usual PNG, and
    zsadx's shards before ``zsadx.data.png``."""
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@contextmanager
def pillow_written_shards():
    """Shards written with Pillow's PNG encoder, as before ``zsadx.data.png`` (images and masks)."""
    saved = shards.encode_png

    def encode(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", compress_level=1 if pixels.ndim == 3 else 6)
        return buf.getvalue()
    shards.encode_png = encode
    try:
        yield
    finally:
        shards.encode_png = saved


def decode_bound(pngs: list[bytes], repeats: int, spng: bool = False) -> tuple[float, float]:
    def decode_all():
        for data in pngs:
            if spng:
                loaders._spng.load(data)
            else:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            yield {"image": torch.empty(1)}
    return best_rate(decode_all, repeats)


def in_process(root: Path, transform: EvalTransform):
    return lambda: ({"image": s["image"][None]} for s in EvalShards(root, transform=transform))


def batch_costs(root: Path, size: int, batch: int = 16) -> dict[str, tuple[float, float]]:
    """(collate ms, pin_memory ms) per batch of ``batch`` samples, uint8 vs float32."""
    samples = list(EvalShards(root, transform=EvalTransform(size=size)))[:batch]
    floats = [{**s, "image": s["image"].float()} for s in samples]
    out = {}
    for name, group in (("uint8", samples), ("float32", floats)):
        t0 = time.perf_counter()
        for _ in range(5):
            b = collate(group)
        t_collate = (time.perf_counter() - t0) / 5 * 1e3
        t_pin = float("nan")
        if torch.cuda.is_available():
            t0 = time.perf_counter()
            for _ in range(5):
                b["image"].pin_memory()
            t_pin = (time.perf_counter() - t0) / 5 * 1e3
        out[name] = (t_collate, t_pin, b["image"].numel() * b["image"].element_size() / 1e6)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--native", type=int, default=900)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="passes per loader; the best is printed")
    ap.add_argument("--passes", type=int, default=4, help="times over the images in one DataLoader pass")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        recs = make_set(tmp / "images", args.images, args.native)
        print(f"generated {args.images} images at {args.native}px in {time.perf_counter() - t0:.1f}s")
        write_manifest(recs, tmp / "manifest.jsonl")
        sizes = {}
        for fmt in FORMATS:
            t0 = time.perf_counter()
            index = write_shards(tmp / "manifest.jsonl", tmp / f"shards-{fmt}", size=args.size, fmt=fmt, workers=args.workers,
                                 progress=False)
            sizes[fmt] = index["bytes"] / args.images / 1e3
            print(f"sharded {fmt:4s} in {time.perf_counter() - t0:5.1f}s: {sizes[fmt]:6.0f} KB/image")
        with pillow_written_shards():
            write_shards(tmp / "manifest.jsonl", tmp / "shards-png-pillow", size=args.size, fmt="png",
                         workers=args.workers, progress=False)
        t = EvalTransform(size=args.size)
        spng = loaders._spng is not None
        ours = [bytes(s["img.png"]) for r in select_shards(tmp / "shards-png") for s in iter_tar(r.path)]
        usual = [pillow_written(data) for data in ours]
        print(f"PNG bytes per image: zsadx (filter Up, zlib RLE) {sum(map(len, ours)) / len(ours) / 1e3:.0f} KB, "
              f"Pillow-written (level 1, adaptive filters) {sum(map(len, usual)) / len(usual) / 1e3:.0f} KB")
        bounds = [("decode bound: PIL, Pillow-written PNG", usual, False),
                  ("decode bound: PIL, zsadx PNG", ours, False)]
        if spng:
            bounds += [("decode bound: libspng, Pillow-written PNG", usual, True),
                       ("decode bound: libspng, zsadx PNG", ours, True)]
        first_bounds = [decode_bound(pngs, args.repeats, dec) for _, pngs, dec in bounds]
        rows = [(name, b, "") for (name, _, _), b in zip(bounds, first_bounds)]
        for fmt in FORMATS:
            rows.append((f"shards {fmt} (uint8)" + (" libspng" if fmt == "png" and spng else ""),
                         best_rate(in_process(tmp / f"shards-{fmt}", t), args.repeats), f"{sizes[fmt]:.0f} KB/img"))
            if fmt == "png" and spng:
                with png_decoder(False):
                    rows.append(("shards png (uint8) Pillow", best_rate(in_process(tmp / "shards-png", t), args.repeats),
                                 f"{sizes[fmt]:.0f} KB/img"))
            if fmt == "png":
                rows.append(("shards png Pillow-written (before)" + (" libspng" if spng else ""),
                             best_rate(in_process(tmp / "shards-png-pillow", t), args.repeats), ""))
        with png_decoder(False):
            rows.append(("shards png, float in workers (before)",
                         best_rate(in_process(tmp / "shards-png-pillow", FloatInWorkers(size=args.size)), args.repeats), ""))
        folder = FolderLoader(recs, args.size)
        rows.append(("folder of PNG (seed-style)",
                     best_rate(lambda: ({"image": folder[i]["image"][None]} for i in range(len(folder))),
                               args.repeats), f"{args.native}px PNG"))
        # Measured again after the loaders, the best of both: a busy moment during one pass would
        # otherwise lower the bounds the loaders are compared with.
        for i, ((name, pngs, dec), first) in enumerate(zip(bounds, first_bounds)):
            again = decode_bound(pngs, args.repeats, dec)
            rows[i] = (name, (max(first[0], again[0]), max(first[1], again[1])), "")
        print(f"\none core, in-process ({args.size}px, {args.images} images, best of {args.repeats}); per core = "
              f"images per CPU second:")
        print(f"{'loader':44s} {'img/s':>8s} {'per core':>9s} {'x bound':>8s}  (bound: PIL on the usual PNG)")
        bound = rows[0][1][1]
        for name, (wall, core), note in rows:
            print(f"{name:44s} {wall:8.1f} {core:9.1f} {core / bound:8.2f}  {note}")

        w = args.workers
        startup = worker_startup_cpu(w)
        print(f"\nthrough a DataLoader, {w} workers, batch 16, {args.passes} x {args.images} images a pass (per core: "
              f"images per CPU second of the workers and the main process; per worker core: of the workers; "
              f"both without the {startup * 1e3:.0f} CPU-ms a pass spends starting its workers):")
        def shard_loader(fmt: str, transform: EvalTransform, workers: int = w):
            # As the evaluator builds it (torch's default collate, which stacks into shared memory).
            return lambda: DataLoader(Passes(EvalShards(tmp / f"shards-{fmt}", transform=transform), args.passes),
                                      batch_size=16, num_workers=workers)

        runs = [(f"shards {fmt}" + (" libspng" if fmt == "png" and spng else ""), shard_loader(fmt, t), True)
                for fmt in FORMATS]
        runs.insert(1, ("shards png Pillow-written (before)" + (" libspng" if spng else ""),
                        shard_loader("png-pillow", t), True))
        if spng:
            runs.insert(1, ("shards png Pillow", shard_loader("png", t), False))
        if w > 1:  # one worker has a core to itself: two decoding at once share the machine's caches
            runs.insert(1, ("shards png" + (" libspng" if spng else "") + ", 1 worker", shard_loader("png", t, 1), True))
        runs += [("shards png, float in workers (before)",
                  shard_loader("png-pillow", FloatInWorkers(size=args.size)), False),
                 ("folder of PNG (seed-style)",
                  lambda: DataLoader(ConcatDataset([folder] * args.passes), batch_size=16, num_workers=w), False)]
        print(f"{'loader':44s} {'img/s':>8s} {'per core':>9s} {'per worker core':>16s}")
        startups = {w: startup}
        for name, make, with_spng in runs:
            workers = make().num_workers
            if workers not in startups:
                startups[workers] = worker_startup_cpu(workers)
            with png_decoder(with_spng):
                wall, core, worker_core = best_rates(make, args.repeats, startups[workers])
            print(f"{name:44s} {wall:8.1f} {core:9.1f} {worker_core:16.1f}")

        print("\nper batch of 16 (collate in the worker; pin_memory needs CUDA):")
        for name, (c, p, mb) in batch_costs(tmp / "shards-png", args.size).items():
            pin = f"{p:6.2f} ms" if p == p else "n/a (no CUDA)"
            print(f"{name:8s} {mb:6.1f} MB  collate {c:6.2f} ms  pin_memory {pin}")


if __name__ == "__main__":
    main()
