"""The papers' qualitative comparison from a grid's method cells (``zsadx figure``).

Rows are test images of one dataset (a seeded draw among its anomalous images, spread over the
classes, or the keys asked for); columns are the image, its ground-truth mask, then each method's
heat map over the image. All heat maps of a row share one colour scale: its minimum and maximum
over that row's maps of every method (the bar at the row's end gives both), so a method whose map
is flat next to another's peak looks flat, as in the papers' figures.

The maps are not read back from anywhere: each method cell is run again on just those images,
from the cell's own saved evaluation config (``{stem}.config.yaml``) and checkpoint, prepared with
the classes and few-shot references its evaluation used. A cell whose checkpoint or config changed
since it was evaluated is refused (its results file name, which hashes both, no longer fits), so
the figure always shows the maps behind the numbers of ``zsadx table``. PNG or PDF by the output's
extension; drawn with Pillow only.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from zsadx.errors import UserError

log = logging.getLogger(__name__)

FORMATS = {".png": "PNG", ".pdf": "PDF"}


class FigureError(UserError, ValueError):
    """A figure that cannot be drawn as asked (unknown dataset, key or method, a cell not done)."""


# ------------------------------------------------------------------------------------------
# The grid's cells: one column per method
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """An evaluation cell as its marker (``cell.json``) describes it."""
    id: str
    method: str
    train_set: str
    dataset: str
    seed: int
    shots: int
    folder: Path
    status: str
    result: Optional[Path]


def grid_cells(grid_dir: str | Path) -> list[Cell]:
    """The evaluation cells with a marker under a grid's output folder."""
    from zsadx.eval.tables import parse_cell_id, read_json

    root = Path(grid_dir)
    if not root.is_dir():
        raise FigureError(f"{root}: no such grid output folder (give the grid's out_dir, or its config grids/NAME)")
    cells = []
    for marker in sorted(root.rglob("cell.json")):
        data = read_json(marker)
        try:
            parsed = parse_cell_id(data["id"])
        except (ValueError, KeyError, TypeError):
            continue  # a train cell, or a marker being written: not a column
        if parsed is None:
            continue
        result = data.get("result")
        cells.append(Cell(data["id"], *parsed, marker.parent, str(data.get("status")), Path(result) if result else None))
    return cells


def figure_datasets(grid_dir: str | Path) -> list[str]:
    """Datasets with at least one finished evaluation cell (in the order the cells list them)."""
    return list(dict.fromkeys(c.dataset for c in grid_cells(grid_dir) if c.status == "done"))


@dataclass(frozen=True)
class Column:
    label: str
    cell: Cell


def figure_columns(grid_dir: str | Path, dataset: str, methods: Optional[Sequence[str]] = None) -> list[Column]:
    """One column per method of the grid that evaluated ``dataset`` (or per method asked for, in that
    order); a method with cells for several train sets or shot counts gets a column for each, named
    so. Each column shows the done cell of its lowest seed."""
    from zsadx.config import suggest

    cells = grid_cells(grid_dir)
    datasets = sorted({c.dataset for c in cells})
    if dataset not in datasets:
        raise FigureError(f"'--dataset': the grid in {grid_dir} has no evaluation cell of dataset '{dataset}'"
                          + suggest(dataset, datasets) + f"; its datasets: {', '.join(datasets) or 'none'}")
    mine = [c for c in cells if c.dataset == dataset]
    present = list(dict.fromkeys(c.method for c in mine))
    for m in methods or ():
        if m not in present:
            raise FigureError(f"'--methods': method '{m}' has no cell for dataset '{dataset}' in {grid_dir}"
                              + suggest(m, present) + f"; its methods there: {', '.join(present)}")
    columns = []
    for m in (list(dict.fromkeys(methods)) if methods else present):
        variants = sorted({(c.train_set, c.shots) for c in mine if c.method == m})
        for train_set, shots in variants:
            group = sorted((c for c in mine if (c.method, c.train_set, c.shots) == (m, train_set, shots)),
                           key=lambda c: c.seed)
            done = [c for c in group if c.status == "done" and c.result is not None]
            if not done:
                raise FigureError(f"cell {group[0].id} is {group[0].status}, not done: finish it (`zsadx grid run`, "
                                  f"`zsadx grid status` shows why) or leave method '{m}' out with --methods")
            label = m if len(variants) == 1 else f"{m} ({train_set}{f', {shots}-shot' if shots else ''})"
            columns.append(Column(label, done[0]))
    return columns


def cell_config(cell: Cell):
    """The cell's saved evaluation config, refused when its checkpoint or config changed since the
    cell was evaluated (the maps would not be those behind its numbers)."""
    from zsadx.config import load_config
    from zsadx.eval.evaluator import EvalConfig, results_stem

    path = cell.result.with_name(cell.result.stem + ".config.yaml")
    if not path.is_file():
        raise FigureError(f"cell {cell.id}: its evaluation config {path} is missing: evaluate the cell again "
                          f"(`zsadx grid run GRID --force`)")
    cfg = load_config(EvalConfig, path)
    if results_stem(cfg) != cell.result.stem:
        raise FigureError(f"cell {cell.id}: its checkpoint {cfg.checkpoint} or config changed since it was evaluated "
                          f"({cell.result.name}): run the grid again (`zsadx grid run GRID`) so figure and table agree")
    return cfg


# ------------------------------------------------------------------------------------------
# The images: a seeded draw among the anomalous test images, or given keys
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    key: str
    cls: str
    label: int
    has_mask: bool
    shard: str


def dataset_images(shards: str, dataset: str, split: str, classes: Optional[Sequence[str]] = None) -> dict[str, ImageInfo]:
    """Every image of the dataset's split (those classes), from the samples' metadata only."""
    from zsadx.data.shards import ShardError, iter_tar, select_shards

    out = {}
    for ref in select_shards(shards, dataset, classes, split):
        for sample in iter_tar(ref.path):
            try:
                meta = json.loads(sample["json"])
                info = ImageInfo(str(meta["key"]), str(meta["cls"]), int(meta["label"]), bool(meta["has_mask"]), ref.path)
            except (KeyError, ValueError, TypeError) as exc:
                raise ShardError(f"{ref.path}: sample '{sample.get('__key__', '?')}' has a broken 'json' member "
                                 f"({type(exc).__name__}: {exc}); re-create the shards with `zsadx data shard`") from None
            out[info.key] = info
    return out


def pick_images(pool: dict[str, ImageInfo], n: int, seed: int, dataset: str) -> list[str]:
    """``n`` anomalous images (those with a mask when there are any), drawn seeded and spread over
    the classes: one class after the other in a seeded order, each giving its next seeded pick."""
    if n < 1:
        raise FigureError(f"'--images': {n}; ask for 1 or more rows")
    anomalous = [i for i in pool.values() if i.label == 1]
    if any(i.has_mask for i in anomalous):
        anomalous = [i for i in anomalous if i.has_mask]
    if not anomalous:
        raise FigureError(f"dataset '{dataset}' has no anomalous test image in the classes asked for: "
                          f"name images with --keys")
    rng = random.Random(f"figure/{seed}/{dataset}")
    by_class: dict[str, list[str]] = {}
    for i in sorted(anomalous, key=lambda i: i.key):
        by_class.setdefault(i.cls, []).append(i.key)
    order = sorted(by_class)
    rng.shuffle(order)
    for c in order:
        rng.shuffle(by_class[c])
    if n > len(anomalous):
        log.warning("--images %d: dataset '%s' has %d anomalous test images in the classes asked for; drawing all",
                    n, dataset, len(anomalous))
    picked: list[str] = []
    while len(picked) < min(n, len(anomalous)):
        for c in order:
            if by_class[c] and len(picked) < n:
                picked.append(by_class[c].pop())
    return picked


def given_images(pool: dict[str, ImageInfo], keys: Sequence[str], dataset: str, shards: str) -> list[str]:
    from zsadx.config import suggest

    for k in keys:
        if k not in pool:
            raise FigureError(f"'--keys': '{k}' is not a test image of dataset '{dataset}' in {shards}"
                              + suggest(k, pool) + " (keys as the results files' 'scores' name them)")
    return list(dict.fromkeys(keys))


def read_samples(pool: dict[str, ImageInfo], keys: Sequence[str]) -> dict[str, tuple[str, dict]]:
    """key -> (shard, raw sample) for the chosen images (only their shards are read again)."""
    from zsadx.data.shards import iter_tar

    wanted = set(keys)
    out = {}
    for shard in dict.fromkeys(pool[k].shard for k in keys):
        for sample in iter_tar(shard):
            key = json.loads(sample["json"])["key"]
            if key in wanted:
                out[key] = (shard, sample)
    return out


# ------------------------------------------------------------------------------------------
# A cell's maps of those images
# ------------------------------------------------------------------------------------------
# The forward pass is the evaluator's own (score_batch: normalisation on the device, autocast,
# upsampling and smoothing); the set-up follows evaluate() step for step (method build, checkpoint,
# classes, domain, seeded references), so the maps are those the cell's metrics were computed on.

def _device(name: str) -> torch.device:
    """Where the methods run: ``auto`` (a GPU if there is one), ``cpu``, ``cuda[:k]``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FigureError(f"'--device': unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FigureError(f"'--device': {name}, but no GPU is visible here; use --device cpu (or auto)")
    return device


def cell_maps(cell: Cell, cfg, samples: Sequence[tuple[str, dict]],
              device: torch.device) -> tuple[list[np.ndarray], list[float]]:
    """The cell's heat map (at its evaluation size) and image score of each sample, in order."""
    from zsadx.data.loaders import collate, decode_sample
    from zsadx.eval.evaluator import prepare_evaluation, score_batch

    setup = prepare_evaluation(cfg, device)
    method, classes, transform, eval_size = setup.method, setup.classes, setup.transform, setup.eval_size
    decoded = [decode_sample(sample, transform, shard) for shard, sample in samples]
    outside = [d["key"] for d in decoded if d["cls"] not in classes]
    if outside:
        raise FigureError(f"cell {cell.id} evaluated classes {', '.join(classes)} only; image '{outside[0]}' is "
                          f"of another: pick images of those classes (--classes, --keys)")
    amp = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast]
    maps, scores = [], []
    for lo in range(0, len(decoded), cfg.data.batch_size):
        batch_maps, batch_scores = score_batch(method, collate(decoded[lo:lo + cfg.data.batch_size]), cfg, device,
                                               eval_size, amp)
        maps += [m.numpy() for m in batch_maps.cpu()]
        scores += batch_scores.cpu().tolist()
    return maps, scores


# ------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------

@dataclass
class Row:
    key: str
    cls: str
    image: np.ndarray          # (P, P, 3) uint8
    mask: np.ndarray           # (P, P) bool
    maps: list[np.ndarray]     # one (P, P) float map per method, as drawn
    scores: list[float]        # each method's image score

    @property
    def scale(self) -> tuple[float, float]:
        """The row's colour scale: min and max over every method's map of this image."""
        return min(float(m.min()) for m in self.maps), max(float(m.max()) for m in self.maps)


@dataclass
class FigureData:
    """What the figure shows: the methods' columns and one row per image."""
    dataset: str
    columns: list[Column]
    rows: list[Row]
    caption: list[str]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """The text, cut with '…' to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def caption(dataset: str, n: int, seed: int, given: bool) -> list[str]:
    chosen = "images given by key" if given else f"anomalous test images, seeded draw (seed {seed}) over the classes"
    return [f"{dataset}: {n} {chosen}",
            "heat maps: one colour scale per row, shared by all methods (that row's min..max, bar at right)"]


def render(data: FigureData, panel: int):
    """The figure as a PIL image, and where each panel lies: (row, column) -> its top left corner
    (column 0 the image, 1 the ground truth, 2... the methods)."""
    from PIL import Image, ImageDraw

    from zsadx.eval.visualize import colour_bar, overlay

    gap, pad, left, bar_w, bar_area = 4, 10, 120, 12, 70
    font, small = _font(13), _font(11)
    rows, lines = data.rows, data.caption
    head = pad + 18 * len(lines) + 6 + 18
    n_cols = 2 + len(data.columns)
    width = pad + left + n_cols * (panel + gap) + bar_area
    height = head + len(rows) * (panel + gap) + pad
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((pad, pad + 18 * i), _fit(d, line, font, width - 2 * pad), fill="black", font=font)
    x0 = pad + left
    for j, name in enumerate(["image", "ground truth", *(c.label for c in data.columns)]):
        text = _fit(d, name, font, panel)
        d.text((x0 + j * (panel + gap) + (panel - d.textlength(text, font=font)) / 2, head - 18), text,
               fill="black", font=font)
    bar = Image.fromarray(colour_bar(panel, bar_w))
    boxes = {}
    for i, row in enumerate(rows):
        y = head + i * (panel + gap)
        d.text((pad, y + panel / 2 - 16), _fit(d, row.cls, font, left - 6), fill="black", font=font)
        d.text((pad, y + panel / 2 + 2), _fit(d, row.key.rsplit("/", 1)[-1], small, left - 6), fill=(90, 90, 90),
               font=small)
        lo, hi = row.scale
        gt = np.repeat(row.mask.astype(np.uint8)[..., None] * 255, 3, -1)
        panels = [row.image, gt, *(overlay(row.image, m, vmin=lo, vmax=hi) for m in row.maps)]
        for j, p in enumerate(panels):
            boxes[(i, j)] = (x0 + j * (panel + gap), y)
            img.paste(Image.fromarray(p), boxes[(i, j)])
        bx = x0 + n_cols * (panel + gap) + 2
        img.paste(bar, (bx, y))
        d.text((bx + bar_w + 4, y - 2), f"{hi:.3g}", fill="black", font=small)
        d.text((bx + bar_w + 4, y + panel - 12), f"{lo:.3g}", fill="black", font=small)
    return img, boxes


def _out_format(out: Path) -> str:
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise FigureError(f"'--out': {out}: write a .png or a .pdf (the format follows the extension)")
    return fmt


def shown_row(info: ImageInfo, shard: str, sample: dict, maps: list[np.ndarray], scores: list[float], panel: int,
              mask_resize: str) -> Row:
    """The row's image and ground truth at the panel size, by the evaluation's mask rule."""
    from zsadx.data.loaders import decode_sample
    from zsadx.data.transforms import EvalTransform
    from zsadx.eval.visualize import denormalise, resize_map

    d = decode_sample(sample, EvalTransform(size=panel, mask_resize=mask_resize, mask_size=panel), shard)
    return Row(info.key, info.cls, denormalise(d["image"]), d["mask"].numpy() > 0,
               [resize_map(m, panel) for m in maps], scores)


def figure_data(grid: str | Path, dataset: str, *, images: int = 6, classes: Optional[Sequence[str]] = None,
                keys: Optional[Sequence[str]] = None, seed: int = 0, methods: Optional[Sequence[str]] = None,
                device: str = "auto", panel: int = 160) -> FigureData:
    """Choose the images and run each method cell on them (see :func:`draw_figure`)."""
    dev = _device(device)
    columns = figure_columns(grid, dataset, methods)
    configs = [cell_config(c.cell) for c in columns]
    first = configs[0]
    pool = dataset_images(first.data.shards, dataset, first.data.split, classes or first.data.classes)
    chosen = (given_images(pool, keys, dataset, first.data.shards) if keys
              else pick_images(pool, images, seed, dataset))
    samples = read_samples(pool, chosen)
    per_column = []
    for col, cfg in zip(columns, configs):
        log.info("figure: %s (%s) on %d images", col.label, col.cell.id, len(chosen))
        per_column.append(cell_maps(col.cell, cfg, [samples[k] for k in chosen], dev))
    rows = [shown_row(pool[k], *samples[k], [maps[i] for maps, _ in per_column],
                      [scores[i] for _, scores in per_column], panel, first.data.mask_resize)
            for i, k in enumerate(chosen)]
    return FigureData(dataset, columns, rows, caption(dataset, len(rows), seed, bool(keys)))


def draw_figure(grid: str | Path, dataset: str, out: str | Path, *, images: int = 6,
                classes: Optional[Sequence[str]] = None, keys: Optional[Sequence[str]] = None, seed: int = 0,
                methods: Optional[Sequence[str]] = None, device: str = "auto", panel: int = 160) -> Path:
    """Draw the qualitative figure of ``dataset`` from the grid output folder ``grid`` into ``out``
    (.png or .pdf, written atomically); returns ``out``. ``images`` rows drawn with ``seed`` among
    the anomalous test images (of ``classes``), or the ``keys`` given; ``methods``: the columns."""
    from zsadx.files import atomic_target

    out = Path(out)
    fmt = _out_format(out)
    data = figure_data(grid, dataset, images=images, classes=classes, keys=keys, seed=seed, methods=methods,
                       device=device, panel=panel)
    img, _ = render(data, panel)
    with atomic_target(out) as tmp:
        img.save(tmp, format=fmt, **({"resolution": 150.0} if fmt == "PDF" else {}))
    return out
