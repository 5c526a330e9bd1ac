"""Exact, streaming anomaly-detection metrics: AUROC, AP, F1-max and AUPRO from one sort.

Definitions (those of scikit-learn and of the MVTec / anomalib AUPRO):

* AUROC: trapezoidal area under (FPR, TPR) over all distinct thresholds, ties counted half.
* AP: step-wise, sum over distinct thresholds (descending) of (R_n - R_{n-1}) * P_n (not a trapezoid).
* F1-max: max over distinct thresholds of 2PR / (P + R).
* AUPRO: ground-truth regions are the 8-connected components of every mask of the class; each
  region weighs equally. PRO(t) = mean over regions of the fraction of the region above t, FPR(t)
  over all background pixels of the class; the curve over every distinct threshold, starting at
  (0, 0), is integrated up to FPR = 0.3 (linear interpolation at the limit) and divided by 0.3.

How: TPR, precision and PRO change only at a distinct *positive* score (a "level"); between two
levels only negatives join, which moves FPR along a flat stretch. So every metric follows exactly
from, per level u: the positives below u, the negatives >= u and > u, and the PRO weight >= u
(:class:`Levels`). The pixels are kept whole (every pixel of every image with known truth, as
float32: no per-pixel split into background and regions), sorted once in place and searched at the
levels; the region pixels, a few percent, are kept once more with their region ids, and their own
counts are subtracted. Nothing per pixel is grouped, merged or turned into float64. AUROC is the
Mann-Whitney count in integers (equal to the trapezoid), the rest is float64 over the levels.

Where the state lives: ``ClassMetrics(name, device=None)`` keeps float32 numpy arrays on the CPU;
``device=<torch device>`` keeps torch tensors there (e.g. on the evaluator's GPU) and does the sort,
the searches and the PRO scan there too. Only the per-level summary (a few arrays of the number of
distinct positive scores) comes to the host for the final sums, which both paths share.
``state()`` is always host numpy (picklable for ``gather_object``), ``merge()`` takes it onto
the accumulator's own device. Region labelling (scipy, 8-connected) runs on the host masks.
On the host the pixel scores grow in one buffer (``_GrowingScores``) that the final sort works on
in place: the state is 4 bytes per pixel (+ 8 per region pixel), with no second copy at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

FPR_LIMIT = 0.3
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
STATE_FORMAT = 2                                  # float32 scores (1: uint32 keys, before the level counts)
_SIGN = np.uint32(0x80000000)
_EIGHT = np.ones((3, 3), dtype=bool)


class MetricInputError(ValueError):
    """Scores or masks that no metric can be computed from; the message names class and batch."""


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """float -> uint32 with the same order (ties stay ties: -0.0 and +0.0 map to one key)."""
    x = np.array(scores, dtype=np.float32, copy=True, order="C")
    x += np.float32(0.0)  # -0.0 + 0.0 = +0.0
    u = x.view(np.uint32)
    # Negative floats: flip all bits; others: set the sign bit. (arithmetic shift gives 0 or -1)
    flip = (x.view(np.int32) >> 31).view(np.uint32)
    flip |= _SIGN
    u ^= flip
    return u


def key_of(value: float) -> np.uint32:
    """Key of the largest float32 not above ``value``: ``s > value`` iff ``key(s) > key_of(value)``."""
    f = np.float32(value)
    if float(f) > value:
        f = np.nextafter(f, np.float32(-np.inf))
    return sortable_keys(np.array([f]))[0]


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a binary mask: (int32 labels, count)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=_EIGHT)
    return labels.astype(np.int32, copy=False), int(n)


def region_ids(masks: np.ndarray, rows: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """8-connected regions of each mask of a (B, H, W) bool stack: the region id of every mask pixel
    (row-major over the stack, as ``scores[masks]``; ids from 0, numbered on across the images) and
    each region's pixel count. Each mask is labelled within the box around its pixels: labelling
    cost follows the defect's size, not the image's. ``rows`` (B, H): ``masks.any(2)``, if known."""
    rows = masks.any(2) if rows is None else rows
    ids, sizes, n = [], [], 0
    for mask, in_row in zip(masks, rows):
        r = np.flatnonzero(in_row)
        if r.size == 0:
            continue
        band = mask[r[0]:r[-1] + 1]
        c = np.flatnonzero(band.any(0))
        box = band[:, c[0]:c[-1] + 1]  # holds every mask pixel, in row-major order
        labels, k = label_regions(box)
        inside = labels[box]
        ids.append(inside - 1 + n)
        sizes.append(np.bincount(inside, minlength=k + 1)[1:])
        n += k
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(ids).astype(np.int32), np.concatenate(sizes).astype(np.int64)


@dataclass
class CurveResult:
    auroc: float
    ap: float
    f1_max: float
    aupro: float = math.nan


# ------------------------------------------------------------------------------------------
# From scores to levels (per backend), from levels to metrics (shared)
# ------------------------------------------------------------------------------------------

@dataclass
class Levels:
    """Per distinct positive score u, ascending (host int64 / float64 arrays, one entry per level)."""

    n_neg: int
    n_pos: int
    pos_below: np.ndarray            # positives < u (where u's first copy sits in the sorted positives)
    neg_ge: np.ndarray               # negatives >= u: false positives at threshold u
    neg_gt: np.ndarray               # negatives > u: false positives just above u
    pro_ge: Optional[np.ndarray]     # PRO at threshold u (PRO weight of the positives >= u); None: no AUPRO


class _NumpyOps:
    """The array operations of the host path (numpy); ``_TorchOps`` mirrors them on a device."""

    device = None

    def floats(self, x) -> np.ndarray:
        return _np(x).astype(np.float32, copy=False)

    def host(self, x) -> np.ndarray:
        return x

    def from_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def cast(self, x: np.ndarray, dtype) -> np.ndarray:
        return x.astype(dtype, copy=False)

    def cat(self, parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    def new_scores(self, expected: int = 0) -> "_GrowingScores":
        return _GrowingScores(expected)

    def all_finite(self, x: np.ndarray) -> bool:
        # A float32 sum is NaN or inf iff a value is, or the sum overflows (then look closer):
        # one read of the maps and no boolean temporary, a third cheaper than isfinite().all().
        with np.errstate(over="ignore", invalid="ignore"):
            total = x.sum()
        return bool(np.isfinite(total)) or bool(np.isfinite(x).all())

    def sort(self, x: np.ndarray) -> np.ndarray:
        """Ascending: in place here (no second buffer of the pixels' size); a new tensor on a device."""
        x.sort()
        return x

    def sorted_with(self, values: np.ndarray, weights: Optional[np.ndarray]):
        if weights is None:
            return np.sort(values), None
        order = np.argsort(values)
        return values[order], weights[order]

    def group_starts(self, sorted_values: np.ndarray) -> np.ndarray:
        changes = np.empty(sorted_values.size, bool)
        changes[:1] = True
        np.not_equal(sorted_values[1:], sorted_values[:-1], out=changes[1:])
        return np.flatnonzero(changes)

    def count_below(self, sorted_values: np.ndarray, levels: np.ndarray, or_equal: bool) -> np.ndarray:
        return np.searchsorted(sorted_values, levels, side="right" if or_equal else "left").astype(np.int64)

    def minimum(self, x: np.ndarray, bound: int) -> np.ndarray:
        return np.minimum(x, bound)

    def cumsum0(self, w: np.ndarray) -> np.ndarray:
        out = np.empty(w.size + 1, np.float64)
        out[0] = 0.0
        np.cumsum(w, out=out[1:])
        return out


class _TorchOps(_NumpyOps):
    """The same operations on torch tensors on one device (a GPU, or the CPU for tests)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self._dtypes = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                        np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                        np.dtype(bool): torch.bool}

    def _dtype(self, dtype):
        return self._dtypes[np.dtype(dtype)]

    def floats(self, x):
        t = x.detach() if isinstance(x, self.torch.Tensor) else self.torch.as_tensor(np.asarray(x))
        return t.to(self.device, self.torch.float32)

    def host(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def from_host(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def copy(self, x):
        return x.clone()

    def empty(self, n: int, dtype):
        return self.torch.empty(n, dtype=self._dtype(dtype), device=self.device)

    def cast(self, x, dtype):
        return x.to(self._dtype(dtype))

    def cat(self, parts: list, dtype):
        if len(parts) == 1:  # no copy of a lone piece
            return parts[0].to(self._dtype(dtype))
        return self.torch.cat(parts).to(self._dtype(dtype)) if parts else self.empty(0, dtype)

    def new_scores(self, expected: int = 0) -> "_ScorePieces":
        return _ScorePieces(self)

    def all_finite(self, x) -> bool:
        return bool(self.torch.isfinite(x).all())

    def sort(self, x):
        return self.torch.sort(x).values

    def sorted_with(self, values, weights):
        s = self.torch.sort(values)
        return s.values, (weights[s.indices] if weights is not None else None)

    def group_starts(self, sorted_values):
        changes = self.torch.ones(sorted_values.numel(), dtype=self.torch.bool, device=self.device)
        changes[1:] = sorted_values[1:] != sorted_values[:-1]
        return self.torch.nonzero(changes).flatten()

    def count_below(self, sorted_values, levels, or_equal: bool):
        return self.torch.searchsorted(sorted_values, levels, right=or_equal)

    def minimum(self, x, bound: int):
        return x.clamp(max=bound)

    def cumsum0(self, w):
        out = self.torch.zeros(w.numel() + 1, dtype=self.torch.float64, device=self.device)
        self.torch.cumsum(w.to(self.torch.float64), 0, out=out[1:])
        return out


_NUMPY = _NumpyOps()


def levels(ops: _NumpyOps, scores_sorted, pos, weights=None, holds_positives: bool = False) -> Levels:
    """The per-level summary of ascending scores and (unsorted) positives with their PRO weights.

    ``scores_sorted`` are the negatives, or with ``holds_positives`` every score, the positives
    among them. Everything of the size of the pixels stays in ``ops``' arrays; what comes back to
    the host has one entry per distinct positive score."""
    n_pos = int(pos.shape[0])
    n_neg = int(scores_sorted.shape[0]) - (n_pos if holds_positives else 0)
    pos, weights = ops.sorted_with(pos, weights)
    starts = ops.group_starts(pos)
    at = pos[starts]
    below = ops.count_below(scores_sorted, at, or_equal=False)
    pos_below = ops.host(starts).astype(np.int64, copy=False)
    pos_upto = np.append(pos_below[1:], n_pos)
    # Runs of equal scores are short: the count up to u is known unless the score after the
    # level's own positives still equals u, and only those levels are searched again.
    upto = below + ops.from_host(pos_upto - pos_below) if holds_positives else ops.copy(below)
    more = (upto < scores_sorted.shape[0]) & (scores_sorted[ops.minimum(upto, scores_sorted.shape[0] - 1)] == at)
    upto[more] = ops.count_below(scores_sorted, at[more], or_equal=True)
    below, upto = ops.host(below).astype(np.int64, copy=False), ops.host(upto).astype(np.int64, copy=False)
    if holds_positives:
        below, upto = below - pos_below, upto - pos_upto
    pro_ge = None
    if weights is not None:
        cw = ops.cumsum0(weights)
        pro_ge = ops.host(cw[-1] - cw[starts]).astype(np.float64, copy=False)
    return Levels(n_neg=n_neg, n_pos=n_pos, pos_below=pos_below, neg_ge=n_neg - below, neg_gt=n_neg - upto,
                  pro_ge=pro_ge)


def metrics_from_levels(lv: Levels) -> CurveResult:
    n_neg, n_pos = lv.n_neg, lv.n_pos
    pos_at = np.diff(lv.pos_below, append=n_pos)           # positives scoring exactly u
    tp = n_pos - lv.pos_below                               # true positives at threshold u
    # AUROC as Mann-Whitney: each positive beats the negatives below it, ties count half (doubled:
    # integers throughout, one division at the end; int64 holds 2 * n_pos * n_neg up to 9e18).
    wins2 = int(np.dot(pos_at, 2 * n_neg - lv.neg_ge - lv.neg_gt))
    auroc = wins2 / (2 * n_pos * n_neg)
    precision = tp / (tp + lv.neg_ge)
    ap = float(np.sum(pos_at * precision) / n_pos)
    # F1 = 2PR / (P + R) = 2 TP / (TP + FP + P_total); for each TP the fewest FP is at the level itself.
    f1 = float(np.max(2 * tp / (tp + lv.neg_ge + n_pos)))
    aupro = _aupro(lv) if lv.pro_ge is not None else math.nan
    return CurveResult(auroc=auroc, ap=ap, f1_max=f1, aupro=aupro)


def _aupro(lv: Levels) -> float:
    """Thresholds descend through the levels: between two levels only negatives join (FPR grows at
    the PRO of the level above), at a level its negatives and positives join in one straight step.
    So the curve is the polyline (0, 0), then per level from the top (FPR just above it, PRO above
    it), (FPR at it, PRO at it), and finally (1, total PRO)."""
    m = lv.neg_ge.size
    pro = lv.pro_ge[::-1]
    xs, ys = np.empty(2 * m + 2), np.empty(2 * m + 2)
    xs[0] = ys[0] = ys[1] = 0.0
    xs[1:-1:2] = lv.neg_gt[::-1] / lv.n_neg
    xs[2:-1:2] = lv.neg_ge[::-1] / lv.n_neg
    xs[-1] = 1.0
    ys[3:-1:2] = pro[:-1]
    ys[2:-1:2] = pro
    ys[-1] = pro[-1]
    return _area_up_to(xs, ys, FPR_LIMIT) / FPR_LIMIT


def _area_up_to(xs: np.ndarray, ys: np.ndarray, limit: float) -> float:
    """Trapezoidal area under a polyline with non-decreasing xs (from <= limit to > limit), cut at ``limit``."""
    j = int(np.argmax(xs > limit))
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    x = np.append(xs[:j], limit)
    y = np.append(ys[:j], y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _curve(ops: _NumpyOps, scores_sorted, pos, weights=None, holds_positives: bool = False) -> CurveResult:
    n_neg = scores_sorted.shape[0] - (pos.shape[0] if holds_positives else 0)
    if n_neg == 0 or pos.shape[0] == 0:
        return CurveResult(math.nan, math.nan, math.nan, math.nan)
    return metrics_from_levels(levels(ops, scores_sorted, pos, weights, holds_positives))


def curve_metrics(neg: np.ndarray, pos: np.ndarray, pos_weights: Optional[np.ndarray] = None) -> CurveResult:
    """Exact metrics from negative and positive scores (any numpy dtype with the order wanted:
    float32 scores or ``sortable_keys``); ``neg`` is sorted in place.

    ``pos_weights`` (float64, one per positive) are the AUPRO increments 1 / (|C_k| * K); omit them
    for image-level metrics. Returns NaN for every metric that is undefined (no positive or no
    negative sample).
    """
    return _curve(_NUMPY, _NUMPY.sort(neg), pos, pos_weights)


class _GrowingScores:
    """The host path's pixel scores: batches appended into one float32 buffer, so the final sort
    runs on it directly -- no list of pieces joined into a second buffer at the end.

    ``expected`` (the pixels the caller will add, when it knows: the evaluator does, from the
    index) is allocated up front, untouched: the kernel backs each page when a batch is first
    written into it, so nothing is zero-filled or moved. Growing with ``ndarray.resize`` instead
    zero-fills every new part before the batch is written over it, which cost 0.13 s of 0.26 s when
    adding 53.7 M pixels (``benchmarks/metrics.py``). Without a size, or past it, the buffer grows
    with ``resize`` (remapped, not copied). What is left over is given back before the sort."""

    GROWTH = 1.125

    def __init__(self, expected: int = 0):
        self._buf = np.empty(0, np.float32)
        self._expected = max(int(expected), 0)
        self.size = 0
        self._lent = 0       # the length of the shortest view into the buffer (state()): never reallocate under it

    def append(self, scores: np.ndarray, fresh: bool = False) -> None:
        end = self.size + scores.size
        if end > self._buf.size:
            self._reserve(max(end, int(self._buf.size * self.GROWTH)))
        self._buf[self.size:end] = scores
        self.size = end

    def _reserve(self, capacity: int) -> None:
        if self._buf.size == 0 and self._expected >= capacity:
            self._buf, self._lent = np.empty(self._expected, np.float32), 0
        elif self._lent or self._buf.size == 0:
            grown = np.empty(capacity, np.float32)
            grown[:self.size] = self._buf[:self.size]
            self._buf, self._lent = grown, 0
        else:
            self._buf.resize(capacity, refcheck=False)

    def sorted(self) -> np.ndarray:
        """All scores, ascending, sorted in place. Unused room is given back first (a remap, not a
        copy). Views handed out by ``state()`` over all the scores (the evaluator takes the state
        just before it computes) only see their own scores reordered; if one covers fewer (a state
        taken mid-run, with scores added after it), the scores are copied out first so it keeps them."""
        if self._lent and self._lent < self.size:
            self._buf, self._lent = self._buf[:self.size].copy(), 0
        elif self._buf.size > self.size:
            if self._lent:
                self._buf = self._buf[:self.size]  # the view's memory stays where it is
            else:
                self._buf.resize(self.size, refcheck=False)
        self._buf.sort()
        return self._buf

    def pieces(self) -> list:
        self._lent = self._lent or self.size  # the shortest view into this buffer: the first one
        return [self._buf[:self.size]] if self.size else []


class _ScorePieces:
    """The device path's pixel scores: one tensor per batch, joined and sorted once at the end."""

    def __init__(self, ops: "_TorchOps"):
        self._ops, self._pieces, self.size = ops, [], 0

    def append(self, scores, fresh: bool = False) -> None:
        self._pieces.append(scores if fresh else self._ops.copy(scores))
        self.size += int(scores.shape[0])

    def sorted(self):
        joined = self._ops.cat(self._pieces, np.float32)
        self._pieces = [self._ops.sort(joined)]  # keep the sorted one only
        return self._pieces[0]

    def pieces(self) -> list:
        return list(self._pieces)


# ------------------------------------------------------------------------------------------
# Per-class accumulation
# ------------------------------------------------------------------------------------------

@dataclass
class ClassMetrics:
    """Streaming state of one class: image scores and, for pixel metrics, scores and regions.

    ``device=None`` keeps the state as numpy on the host; a torch device (``"cuda"``,
    ``torch.device("cuda", 1)``, ``"cpu"``...) keeps it as torch tensors there: inputs on any
    device are moved there, and the reduction runs there (see the module notes).
    """

    name: str
    pixel: bool = True
    device: Any = None
    image_scores: list = field(default_factory=list)
    image_labels: list = field(default_factory=list)
    _pos: list = field(default_factory=list)      # float32 scores of region pixels (also in _all)
    _reg: list = field(default_factory=list)      # int32 global region id of each region pixel
    _sizes: list = field(default_factory=list)    # int64 pixel count of each region
    n_regions: int = 0
    n_masks: int = 0
    pixel_excluded: int = 0                       # anomalous images without a mask: no pixel ground truth
    batches: int = 0
    expected_pixels: int = field(default=0, compare=False)  # a size hint for the pixel state (0: unknown)
    _ops: _NumpyOps = field(init=False, repr=False, compare=False)
    _all: Any = field(init=False, repr=False, compare=False)  # float32 scores of every pixel with known truth

    def __post_init__(self) -> None:
        self._ops = _NUMPY if self.device is None else _TorchOps(self.device)
        self._all = self._ops.new_scores(self.expected_pixels)

    def add(self, image_scores, labels, maps=None, masks=None, batch: int | str | None = None,
            has_mask=None) -> None:
        """Add a batch: image scores (B,), labels (B,), and optionally maps (B,H,W) with masks (B,H,W).

        ``has_mask`` (B,) says which images have a ground-truth mask. An anomalous image without
        one has no known pixel labels (its defect is somewhere, its mask is blank), so its pixels
        are left out of every pixel metric rather than counted as normal; it still counts for the
        image metrics. Omitted, every mask is taken as ground truth.
        """
        ops = self._ops
        where = f"class '{self.name}', batch {batch if batch is not None else self.batches}"
        s = ops.floats(image_scores).reshape(-1)
        y = _np(labels).reshape(-1).astype(bool)
        if tuple(s.shape) != y.shape:
            raise MetricInputError(f"{where}: {s.shape[0]} image scores for {y.size} labels")
        if not ops.all_finite(s):
            raise MetricInputError(f"{where}: image scores hold NaN or inf")
        if maps is not None and self.pixel:
            m = ops.floats(maps)
            if masks is None:
                raise MetricInputError(f"{where}: anomaly maps given without masks")
            g = _np(masks)
            if tuple(m.shape) != g.shape or m.ndim != 3:
                raise MetricInputError(f"{where}: maps {tuple(m.shape)} and masks {tuple(g.shape)} must both be (B,H,W)")
            if m.shape[0] != y.size:
                raise MetricInputError(f"{where}: {m.shape[0]} maps for {y.size} images")
            if not ops.all_finite(m):
                raise MetricInputError(f"{where}: anomaly maps hold NaN or inf")
            self._add_pixels(m, g.astype(bool, copy=False), _pixel_truth_known(y, has_mask, where))
        self.image_scores.append(ops.copy(s))
        self.image_labels.append(ops.from_host(y))
        self.batches += 1

    def _add_pixels(self, maps, masks: np.ndarray, known: np.ndarray) -> None:
        """Every pixel's score to ``_all``; region pixels' scores to ``_pos``, their region ids to ``_reg``."""
        ops = self._ops
        self.pixel_excluded += int((~known).sum())
        fresh = not known.all()
        if fresh:                                  # indexing makes a new array
            maps, masks = maps[ops.from_host(known)], masks[known]
        if maps.shape[0] == 0:
            return
        self._all.append(maps.reshape(-1), fresh=fresh)  # copied unless fresh: the caller may reuse its buffer
        rows = masks.any(2)
        masked = rows.any(1)
        if not masked.any():
            return
        ids, sizes = region_ids(masks, rows)
        self._pos.append(maps[ops.from_host(masks)])
        self._reg.append(ops.from_host(ids + self.n_regions))
        self._sizes.append(ops.from_host(sizes))
        self.n_regions += int(sizes.size)
        self.n_masks += int(masked.sum())

    # -- results --------------------------------------------------------------------------
    def image_metrics(self) -> CurveResult:
        ops = self._ops
        if not self.image_scores:
            return CurveResult(math.nan, math.nan, math.nan, math.nan)
        s = ops.cat(self.image_scores, np.float32)
        y = ops.cat(self.image_labels, bool)
        return _curve(ops, ops.sort(s[~y]), s[y])

    def pixel_metrics(self) -> CurveResult:
        ops = self._ops
        if self.n_regions == 0:
            return CurveResult(math.nan, math.nan, math.nan, math.nan)
        scores = self._all.sorted()
        pos = ops.cat(self._pos, np.float32)
        reg = ops.cat(self._reg, np.int64)
        sizes = ops.cat(self._sizes, np.int64)
        weights = 1.0 / (ops.cast(sizes[reg], np.float64) * self.n_regions)
        return _curve(ops, scores, pos, weights, holds_positives=True)

    def arrays(self) -> dict:
        """The raw state on the host, scores as ``sortable_keys`` (``all``: every pixel, the region
        pixels ``pos`` among them), for the paper-compatible variants."""
        def host(parts: list, dtype) -> np.ndarray:
            return np.concatenate([self._ops.host(p) for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)

        return {"all": sortable_keys(host(self._all.pieces(), np.float32)), "pos": sortable_keys(host(self._pos, np.float32)),
                "reg": host(self._reg, np.int32), "sizes": host(self._sizes, np.int64)}

    def compute(self) -> dict[str, float]:
        img = self.image_metrics()
        out = {"image_auroc": img.auroc, "image_ap": img.ap, "image_f1_max": img.f1_max}
        if self.pixel:
            px = self.pixel_metrics()
            out.update(pixel_auroc=px.auroc, pixel_ap=px.ap, pixel_f1_max=px.f1_max, pixel_aupro=px.aupro)
        return out

    _LISTS = ("image_scores", "image_labels", "_pos", "_reg", "_sizes")
    _COUNTS = ("n_regions", "n_masks", "pixel_excluded", "batches")

    def state(self) -> dict:
        """Picklable state for gathering across ranks: host numpy arrays, whatever the device."""
        st = {"format": STATE_FORMAT, "name": self.name, "pixel": self.pixel}
        st.update({k: [self._ops.host(a) for a in getattr(self, k)] for k in self._LISTS})
        st["_all"] = [self._ops.host(a) for a in self._all.pieces()]
        st.update({k: getattr(self, k) for k in self._COUNTS})
        return st

    def merge(self, other: "ClassMetrics | dict") -> None:
        """Append another accumulator's state (region ids are re-numbered after ours), onto our device."""
        st = other.state() if isinstance(other, ClassMetrics) else other
        if st.get("format") != STATE_FORMAT:
            raise MetricInputError(f"class '{self.name}': metric state of format {st.get('format', 1)}, this "
                                   f"zsadx reads format {STATE_FORMAT}: gather states from one zsadx version")
        to_here = self._ops.from_host
        self.image_scores += [to_here(a) for a in st["image_scores"]]
        self.image_labels += [to_here(a) for a in st["image_labels"]]
        for a in st["_all"]:
            self._all.append(to_here(a), fresh=self._ops.device is not None)  # from_host copied it there
        self._pos += [to_here(a) for a in st["_pos"]]
        self._reg += [to_here(r + self.n_regions) for r in st["_reg"]]
        self._sizes += [to_here(a) for a in st["_sizes"]]
        self.n_regions += st["n_regions"]
        self.n_masks += st["n_masks"]
        self.pixel_excluded += st.get("pixel_excluded", 0)
        self.batches += st["batches"]


def _pixel_truth_known(labels: np.ndarray, has_mask, where: str) -> np.ndarray:
    """Per image: are its pixel labels known? Normal images (all background) and masked anomalous ones."""
    if has_mask is None:
        return np.ones(labels.size, bool)
    h = _np(has_mask).reshape(-1).astype(bool)
    if h.size != labels.size:
        raise MetricInputError(f"{where}: {h.size} has_mask flags for {labels.size} labels")
    return ~labels.astype(bool) | h


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        if x.dtype.is_floating_point and x.dtype not in (__import__("torch").float16, __import__("torch").float32):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def mean_over_classes(per_class: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Unweighted mean over classes, leaving out NaN (undefined) entries; also which classes were left out."""
    names = sorted({k for v in per_class.values() for k in v})
    mean, undefined = {}, {}
    for k in names:
        vals = [v[k] for v in per_class.values() if k in v and v[k] is not None and not math.isnan(v[k])]
        undefined[k] = sorted(c for c, v in per_class.items() if k in v and (v[k] is None or math.isnan(v[k])))
        mean[k] = float(np.mean(vals)) if vals else math.nan
    return mean, {k: v for k, v in undefined.items() if v}
