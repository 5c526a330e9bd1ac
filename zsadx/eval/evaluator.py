"""The evaluator: a method over a dataset's eval shards -> one results file per evaluated cell.

Batches come from :class:`EvalShards` (each sample once across ranks); the method's maps are
upsampled to the image size and smoothed as its config says; metrics accumulate per class. Under
several processes (``accelerate launch``) every rank sends its metric state to rank 0, which
merges and computes: the numbers are those of one process, since the metrics are exact and do not
depend on order. The results file is written atomically (temp file + rename), under a name that
differs for every method config, checkpoint, dataset, class selection, shot count and seed
(:func:`results_stem`). Anomalous images without a mask count for the image metrics only.

The batch loop has three stages that overlap (:func:`score_batches`): loader workers decode
uint8 images, the main thread normalises them on the device and runs the model, and a background
thread accumulates the metrics (on the device when it is a GPU) behind a short queue.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch

from zsadx.config import ConfigError, save_resolved, to_dict
from zsadx.eval.metrics import ClassMetrics, mean_over_classes
from zsadx.files import hash_file
from zsadx.tracking import TrackerConfig
from zsadx.models.methods.base import MethodConfig, build_method, method_field
from zsadx.models.scoring import gaussian_blur, upsample

log = logging.getLogger(__name__)


@dataclass
class EvalDataConfig:
    shards: str = ""
    dataset: str = ""
    classes: Optional[list[str]] = None
    split: str = "test"
    batch_size: int = 8
    num_workers: int = 2
    mask_resize: Literal["bilinear", "nearest"] = "bilinear"
    reference_split: str = "train"    # where few-shot methods draw their normal references from


@dataclass
class EvalConfig:
    method: MethodConfig = method_field()
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    checkpoint: Optional[str] = None
    # A trained method without a checkpoint is refused unless this says its untrained start is meant.
    untrained: bool = False
    out_dir: str = "runs/eval"
    autocast: Literal["no", "bf16", "fp16"] = "no"
    save_scores: bool = True          # per-image scores in the results file
    save_overlays: int = 0            # overlay PNGs (image | heat-map | ground truth) of the first N per class
    paper_compat: bool = False        # also compute the seeds' own metric variants
    device: str = "auto"
    seed: int = 0
    progress: bool = True             # a bar per dataset on rank 0, drawn only when stderr is a terminal
    # Metrics in a background thread, overlapping loading and the model; false: one stage after the
    # other (the same results, slower). Neither changes the numbers, so neither is in the file name.
    pipeline: bool = True
    # Where the metric state lives and is reduced: host (numpy), device (torch tensors on the
    # evaluator's device, also on a CPU), auto (device on a GPU, host elsewhere). The same values
    # to float rounding (1e-9), so not in the file name either.
    metrics_on: Literal["auto", "host", "device"] = "auto"
    tracking: TrackerConfig = field(default_factory=TrackerConfig)

    def validate(self) -> None:
        if not self.data.shards or not self.data.dataset:
            raise ConfigError("'data.shards' and 'data.dataset' are required for an evaluation")
        if self.data.batch_size < 1:
            raise ConfigError(f"'data.batch_size': {self.data.batch_size} images per batch; use 1 or more")
        if self.data.num_workers < 0:
            raise ConfigError(f"'data.num_workers': {self.data.num_workers} loader processes; use 0 (load in "
                              f"the main process) or more")
        if self.save_overlays < 0:
            raise ConfigError(f"'save_overlays': {self.save_overlays}; use 0 (none) or a number of images per class")
        if self.untrained and self.checkpoint:
            raise ConfigError(f"'untrained': true with a checkpoint ({self.checkpoint}): give one or the other")


# ------------------------------------------------------------------------------------------
# Results file names: one file per evaluated cell
# ------------------------------------------------------------------------------------------

def results_stem(cfg: EvalConfig) -> str:
    """``<method>-<checkpoint>-<k>shot-seed<s>-<hash>-<dataset>``: readable, and distinct for every
    cell. The hash covers everything that changes the numbers (the whole method config, the
    checkpoint's content, the classes, split, reference split, mask resizing, autocast), so two
    evaluations share a file only when they compute the same thing and a re-run replaces only its own."""
    return "-".join([_name_part(cfg.method.name), _name_part(checkpoint_label(cfg)), f"{cfg.method.shots}shot",
                     f"seed{cfg.seed}", cell_hash(cfg), _name_part(cfg.data.dataset)])


def results_name(cfg: EvalConfig) -> str:
    return results_stem(cfg) + ".json"


def checkpoint_label(cfg: EvalConfig) -> str:
    """The checkpoint's file stem; ``untrained`` for a trained method run from its initialisation,
    ``zero-shot`` for a training-free method."""
    if cfg.checkpoint:
        return Path(cfg.checkpoint).stem
    return "untrained" if cfg.untrained else "zero-shot"


def cell_hash(cfg: EvalConfig) -> str:
    identity = {"method": to_dict(cfg.method), "checkpoint": checkpoint_identity(cfg.checkpoint),
                "dataset": cfg.data.dataset, "classes": sorted(cfg.data.classes) if cfg.data.classes else None,
                "split": cfg.data.split, "reference_split": cfg.data.reference_split,
                "mask_resize": cfg.data.mask_resize, "autocast": cfg.autocast, "seed": cfg.seed,
                "untrained": cfg.untrained}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def checkpoint_identity(path: Optional[str]) -> Optional[str]:
    """The checkpoint's sha256: its content wherever it lies (a file, or every file of a checkpoint
    folder with its relative name); its path when it cannot be read (loading it reports that)."""
    if not path:
        return None
    root = Path(path)
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0")
            hash_file(f, digest)
    except OSError:
        return str(path)
    return digest.hexdigest()


def _name_part(text: str) -> str:
    """Characters other than letters, digits, '.', '_' and '-' become '_' (a name from a user's path)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).lstrip(".") or "_"


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _init_distributed() -> None:
    """Join the process group when started by a launcher (accelerate launch / torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")


def eval_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU. A GPU gets its index here, in the main
    thread (a launcher has set this rank's): "cuda" alone would mean GPU 0 in the metrics thread."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class PreparedEvaluation:
    """A method ready to score one dataset, with what its evaluation needs to know of the data."""

    method: Any
    index: dict
    classes: list[str]
    domain: str
    has_masks: bool
    transform: Any
    eval_size: int
    reference_keys: dict


def prepare_evaluation(cfg: EvalConfig, device: torch.device) -> PreparedEvaluation:
    """Build the method on ``device``, load its checkpoint and prepare it for the dataset (classes,
    domain, seeded few-shot references). One function, so anything that scores images as an
    evaluation did (``zsadx figure``) prepares the method exactly as it."""
    from zsadx.data.shards import load_index
    from zsadx.data.transforms import EvalTransform

    method = build_method(cfg.method).to(device).eval()
    check_trained(method, cfg)
    if cfg.checkpoint:
        method.load_checkpoint(cfg.checkpoint)
    size = cfg.method.input_size or cfg.method.backbone.image_size
    eval_size = cfg.method.eval_size or size
    index = load_index(cfg.data.shards)
    groups = [g for g in index["groups"] if g["dataset"] == cfg.data.dataset and g["split"] == cfg.data.split]
    classes = cfg.data.classes or sorted({g["cls"] for g in groups})
    domain = groups[0]["domain"] if groups else "industrial"
    transform = EvalTransform(size=size, mask_resize=cfg.data.mask_resize, mask_size=eval_size)
    references, reference_keys = None, {}
    if cfg.method.shots > 0:
        references, reference_keys = sample_references(cfg.data.shards, cfg.data.dataset, classes, cfg.method.shots,
                                                       cfg.seed, transform, cfg.data.reference_split, device)
    method.prepare(classes, domain, references)
    return PreparedEvaluation(method, index, classes, domain, any(g["counts"]["masks"] for g in groups), transform,
                              eval_size, reference_keys)


def evaluate(cfg: EvalConfig) -> Optional[dict]:
    """Run the evaluation; returns the results on rank 0 (None on other ranks)."""
    from torch.utils.data import DataLoader

    from zsadx.data.loaders import EvalShards
    from zsadx.version import code_version

    _init_distributed()
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    device = eval_device(cfg.device)
    t_start = time.perf_counter()
    setup = prepare_evaluation(cfg, device)
    method, classes, transform, eval_size = setup.method, setup.classes, setup.transform, setup.eval_size
    index, domain, has_masks, reference_keys = setup.index, setup.domain, setup.has_masks, setup.reference_keys
    ds = EvalShards(cfg.data.shards, cfg.data.dataset, cfg.data.classes, cfg.data.split, transform)
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda")
    stem = results_stem(cfg)  # hashes the checkpoint: once
    state_device = metric_state_device(cfg, device)
    # Each class's pixel state is sized from the index up front (this rank's share of its images).
    expected = ds.rank_class_counts() if has_masks else {}
    sink = MetricSink(cfg, {c: ClassMetrics(c, pixel=has_masks, device=state_device,
                                            expected_pixels=expected.get(c, 0) * eval_size * eval_size)
                            for c in classes}, has_masks, Path(cfg.out_dir) / "overlays" / stem, rank)
    clock = StageClock()
    with progress_bar(cfg, ds.rank_count(), rank) as bar:
        sink.bar = bar
        n_images = score_batches(loader, method, cfg, device, eval_size, sink, clock)
    acc, scores_out = sink.acc, sink.scores
    states = {c: a.state() for c, a in acc.items()}
    if world > 1:
        gathered: list[Any] = [None] * world if rank == 0 else None
        torch.distributed.gather_object((states, scores_out, n_images, clock), gathered, dst=0)
        if rank != 0:
            torch.distributed.barrier()
            return None
        for other, sc, n, other_clock in gathered[1:]:
            for c, st in other.items():
                acc[c].merge(st)
            scores_out += sc
            n_images += n
            clock = clock.slowest(other_clock)
    per_class = {c: a.compute() for c, a in acc.items()}
    mean, undefined = mean_over_classes(per_class)
    results = {"method": cfg.method.name, "dataset": cfg.data.dataset, "domain": domain, "split": cfg.data.split,
               "checkpoint": cfg.checkpoint, "code_version": code_version(), "world_size": world,
               "images": n_images, "classes": classes, "per_class": per_class, "mean": mean,
               "undefined": undefined, **class_coverage(index, cfg.data.dataset, classes),
               "shots": cfg.method.shots, "references": reference_keys,
               "seconds": round(time.perf_counter() - t_start, 3),
               "model_seconds": round(clock.model, 3),
               "images_per_second": round(n_images / clock.model, 2) if clock.model else None,
               "stage_seconds": clock.rounded(),
               "config": to_dict(cfg)}
    if has_masks:
        # Anomalous images without a mask: image metrics only (their pixel labels are unknown).
        results["pixel_excluded"] = sum(a.pixel_excluded for a in acc.values())
        results["pixel_excluded_per_class"] = {c: a.pixel_excluded for c, a in acc.items()}
    if cfg.paper_compat and has_masks:
        from zsadx.eval.paper_compat import anomalyclip_pro

        results["paper_compat"] = {"anomalyclip_pro": {c: anomalyclip_pro(a) for c, a in acc.items()}}
    if cfg.save_scores:
        results["scores"] = sorted(scores_out, key=lambda r: r["key"])
    write_results(results, Path(cfg.out_dir) / f"{stem}.json")
    save_resolved(cfg, cfg.out_dir, name=f"{stem}.config.yaml")
    if world > 1:
        torch.distributed.barrier()
    return results


# ------------------------------------------------------------------------------------------
# The batch loop: loading, the model and the metrics as three stages
# ------------------------------------------------------------------------------------------

# Keys of the results file that are measurements of this run's speed, not of the method.
TIMING_KEYS = ("seconds", "model_seconds", "images_per_second", "stage_seconds")


def metric_state_device(cfg: EvalConfig, device: torch.device) -> Optional[torch.device]:
    """The device the metric state lives on (None: host numpy). On a GPU the maps then never
    cross to the host: the sort and scans that reduce them run there too."""
    if cfg.metrics_on == "device" or (cfg.metrics_on == "auto" and device.type == "cuda"):
        return device
    return None


@dataclass
class StageClock:
    """Seconds each stage spent on this rank: waiting for the loader, the model on the device,
    the metrics (in their own thread when pipelined), and the whole loop from end to end."""

    load: float = 0.0
    model: float = 0.0
    metrics: float = 0.0
    total: float = 0.0

    def slowest(self, other: "StageClock") -> "StageClock":
        """Stage by stage, the slower rank's time: ranks run side by side."""
        return StageClock(*(max(a, b) for a, b in zip(vars(self).values(), vars(other).values())))

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


@dataclass
class ScoredBatch:
    """What the model stage hands to the metrics stage: the batch (its image only when overlays
    need it) with the maps at the evaluation size and the image scores, wherever they were computed."""

    number: int
    batch: dict
    maps: torch.Tensor
    scores: torch.Tensor


def score_batches(loader, method, cfg: EvalConfig, device: torch.device, eval_size: int, sink: "MetricSink",
                  clock: StageClock) -> int:
    """Every batch through the model, each scored batch to the metrics; returns the images scored.

    With ``cfg.pipeline`` the metrics run in a background thread behind a short queue, so that
    loading (worker processes), the model (this thread, on the device) and the metrics overlap and
    the slowest sets the pace; without it each batch is scored and then accumulated in turn. Both
    accumulate the same batches in the same order, so the results are the same.
    """
    amp = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast]
    stage = BackgroundStage(sink) if cfg.pipeline else InlineStage(sink)
    n_images = 0
    t_loop = time.perf_counter()
    with stage:
        batches = iter(loader)
        for number in itertools.count():
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            clock.load += t1 - t0
            if batch is None:
                break
            maps, scores = score_batch(method, batch, cfg, device, eval_size, amp)
            clock.model += time.perf_counter() - t1
            if not cfg.save_overlays:
                del batch["image"]  # not needed by the metrics: do not hold it in the queue
            stage.put(ScoredBatch(number, batch, maps, scores))
            n_images += len(batch["label"])
    clock.metrics = sink.seconds
    clock.total = time.perf_counter() - t_loop
    return n_images


def score_batch(method, batch: dict, cfg: EvalConfig, device: torch.device, eval_size: int,
                amp: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (B, S, S) at the evaluation size, upsampled and smoothed unless the method's are final,
    and image scores (B,), float32 on the device. The images are normalised there (the loader may
    hand over uint8)."""
    from zsadx.data.transforms import normalise

    batch["image"] = normalise(batch["image"].to(device, non_blocking=True))
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        pred = method.predict(batch)
    maps = pred.maps.float()
    if not pred.final:
        maps = upsample(maps, eval_size, cfg.method.align_corners)
        maps = gaussian_blur(maps, cfg.method.sigma)
    scores = pred.scores.float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the model's time is the device's, not that of queueing kernels
    return maps, scores


class MetricSink:
    """The metrics stage: each scored batch into its classes' accumulators, its scores into the
    per-image list, its first images into overlays; counts them on the progress bar."""

    def __init__(self, cfg: EvalConfig, acc: dict[str, ClassMetrics], has_masks: bool, overlay_dir: Path,
                 rank: int):
        self.cfg, self.acc, self.has_masks, self.overlay_dir, self.rank = cfg, acc, has_masks, overlay_dir, rank
        self.on_device = any(a.device is not None for a in acc.values())
        self.scores: list[dict] = []
        self.overlays_done: dict[str, int] = {}
        self.seconds = 0.0
        self.bar: Any = None

    def __call__(self, scored: ScoredBatch) -> None:
        t0 = time.perf_counter()
        batch = scored.batch
        scores = scored.scores.cpu()  # B numbers, for the per-image list
        # Maps stay where the metric state is: on the device they are never copied whole to the host.
        maps, fed = (scored.maps, scored.scores) if self.on_device else (scored.maps.cpu(), scores)
        for c in set(batch["cls"]):
            idx = [i for i, x in enumerate(batch["cls"]) if x == c]
            self.acc[c].add(fed[idx], batch["label"][idx], maps[idx] if self.has_masks else None,
                            batch["mask"][idx] if self.has_masks else None,
                            batch=f"{scored.number} (rank {self.rank})",
                            has_mask=torch.as_tensor(batch["has_mask"])[idx])
        if self.cfg.save_scores:
            self.scores += [{"key": k, "cls": c, "label": int(l), "score": float(s)}
                            for k, c, l, s in zip(batch["key"], batch["cls"], batch["label"], scores)]
        if self.cfg.save_overlays:
            _overlays(self.cfg, self.overlay_dir, batch, maps, self.overlays_done)
        self.seconds += time.perf_counter() - t0
        if self.bar is not None:
            self.bar.update(len(batch["label"]))


class InlineStage:
    """The sequential path: each item is worked on at once, in the caller's thread."""

    def __init__(self, work: Callable[[Any], None]):
        self._work = work

    def put(self, item: Any) -> None:
        self._work(item)

    def __enter__(self) -> "InlineStage":
        return self

    def __exit__(self, *exc) -> None:
        return None


class BackgroundStage:
    """``work(item)`` for each item put, in order, in one background thread behind a bounded queue.

    ``put`` blocks while the queue is full (the slower side sets the pace) and raises the worker's
    exception once it has failed; leaving the ``with`` block waits for the items still queued and
    raises it too, so a failure in the thread reaches the caller as the same exception. Neither side
    can leave the other waiting: a failed worker keeps draining the queue without working, and when
    the caller fails the items still queued are dropped, not worked on.
    """

    _END = object()

    def __init__(self, work: Callable[[Any], None], depth: int = 4, name: str = "zsadx-metrics"):
        self._work = work
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if self._error is None and not self._dropping:
                try:
                    self._work(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc

    def put(self, item: Any) -> None:
        self._raise_failure()
        self._queue.put(item)

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "BackgroundStage":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._dropping = True  # the caller's error wins; the queued work would be thrown away
        self._queue.put(self._END)
        self._thread.join()
        if exc_type is None:
            self._raise_failure()


@contextmanager
def progress_bar(cfg: EvalConfig, total: int, rank: int) -> Iterator[Any]:
    """A bar over the images this rank evaluates (images/s, ETA), named by the dataset. Drawn by
    rank 0 only, and only on a terminal: logs and pipes (grid cells, CI) get no carriage returns.
    An error clears it, so the CLI's one error line stands alone."""
    from tqdm import tqdm

    shown = cfg.progress and rank == 0 and _is_terminal(sys.stderr)
    bar = tqdm(total=total, unit="img", desc=f"eval {cfg.data.dataset}", file=sys.stderr, disable=not shown,
               dynamic_ncols=True)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def check_trained(method, cfg: EvalConfig) -> None:
    """A trained method needs its checkpoint; evaluating its random start must be asked for."""
    trained = bool(method.trainable_parameters())
    if trained and not cfg.checkpoint and not cfg.untrained:
        raise ConfigError(f"method '{cfg.method.name}' is trained (it has trainable parameters) and no checkpoint "
                          f"was given: pass --checkpoint FILE, or untrained=true to evaluate its untrained "
                          f"initialisation")
    if cfg.untrained and not trained:
        raise ConfigError(f"'untrained': method '{cfg.method.name}' has no trainable parameters, so there is no "
                          f"untrained state to evaluate: drop untrained=true")


def class_coverage(index: dict, dataset: str, evaluated: list[str]) -> dict:
    """Did the evaluation cover all of the dataset's classes? From the shard index's per-dataset
    entry (which classes the shards hold of the catalogue's) and the classes evaluated; an older
    index without that entry counts the classes its groups hold as the whole dataset."""
    entry = (index.get("datasets") or {}).get(dataset) or {}
    held = entry.get("classes") or sorted({g["cls"] for g in index["groups"] if g["dataset"] == dataset})
    catalog = list(entry.get("catalog_classes") or [])
    catalog += [c for c in [*held, *entry.get("missing_classes", [])] if c not in catalog]
    missing = [c for c in catalog if c not in set(evaluated)]
    return {"subset": bool(missing) or bool(entry.get("subset")), "classes_missing": missing,
            "catalog_classes": catalog}


def sample_references(shards: str, dataset: str, classes: list[str], shots: int, seed: int, transform,
                      split: str = "train", device: torch.device | str = "cpu",
                      ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """``shots`` normal images per class from the reference split, chosen by a seeded draw over the
    sorted sample keys (only the chosen ones are decoded). The same on every rank and machine.
    The images come back normalised, on ``device``."""
    import random

    from zsadx.data.loaders import decode_sample
    from zsadx.data.shards import ShardError, iter_tar, select_shards
    from zsadx.data.transforms import normalise

    refs, keys = {}, {}
    for c in classes:
        try:
            shard_refs = select_shards(shards, dataset, [c], split)
        except ShardError:
            shard_refs = []
        raw = {}
        for ref in shard_refs:
            for sample in iter_tar(ref.path):
                if _sample_label(sample, ref.path) == 0:
                    raw[sample["__key__"]] = (ref.path, sample)
        if len(raw) < shots:
            raise ShardError(f"few-shot needs {shots} normal '{split}' images of class '{c}' in {dataset}, "
                             f"the shards hold {len(raw)}: use a dataset with a train split (your own images: put normal "
                             f"references in <root>/train/normal/ of the folder dataset, or convert with --hold-out N; "
                             f"then shard again) "
                             f"or shots=0")
        chosen = sorted(random.Random(f"{seed}/{dataset}/{c}").sample(sorted(raw), shots))
        images = torch.stack([decode_sample(raw[k][1], transform, raw[k][0])["image"] for k in chosen])
        refs[c] = normalise(images.to(device))
        keys[c] = chosen
    return refs, keys


def _sample_label(sample: dict[str, bytes], shard: str) -> int:
    from zsadx.data.shards import ShardError

    try:
        return int(json.loads(sample["json"])["label"])
    except (KeyError, ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShardError(f"{shard}: sample '{sample.get('__key__', '?')}' has a broken 'json' member "
                         f"({type(exc).__name__}: {exc}); re-create the shards with `zsadx data shard`") from None


def write_results(results: dict, path: Path) -> Path:
    from zsadx.files import atomic_write_json

    return atomic_write_json(path, results, indent=1, default=_jsonable, allow_nan=True)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _overlays(cfg: EvalConfig, folder: Path, batch: dict, maps: torch.Tensor, done: dict[str, int]) -> None:
    from zsadx.eval.visualize import overlay_png

    for i, c in enumerate(batch["cls"]):
        if done.get(c, 0) >= cfg.save_overlays:
            continue
        done[c] = done.get(c, 0) + 1
        overlay_png(folder / f"{batch['key'][i].replace('/', '_')}.png", batch["image"][i].cpu(), maps[i].cpu(),
                    batch["mask"][i])
