"""Exact, streaming anomaly-detection metrics: AUROC, AP, F1-max and AUPRO from one sort.

Definitions (those of scikit-learn and of the MVTec / anomalib AUPRO):

* AUROC: trapezoidal area under (FPR, TPR) over all distinct thresholds, ties counted half.
* AP: step-wise, sum over distinct thresholds (descending) of (R_n - R_{n-1}) * P_n (not a trapezoid).
* F1-max: max over distinct thresholds of 2PR / (P + R).
* AUPRO: ground-truth regions are the 8-connected components of every mask of the class; each
  region weighs equally. PRO(t) = mean over regions of the fraction of the region above t, FPR(t)
  over all background pixels of the class; the curve over every distinct threshold, starting at
  (0, 0), is integrated up to FPR = 0.3 (linear interpolation at the limit) and divided by 0.3.

How (``curve_metrics``): scores become 32-bit keys whose unsigned order is the float order.
Negative (background) pixels are kept as bare keys, positive pixels as (key, region id) pairs --
positives are a few percent of the pixels. Negatives are sorted once (one ``np.sort`` of uint32,
in place), positives separately; one descending pass over the sorted keys, chunk by chunk, merges
the two, collapses ties and accumulates all four metrics with int64 counts. Memory is 4 bytes per
negative pixel plus 8 per positive, and nothing of the size of the class is ever float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

FPR_LIMIT = 0.3
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
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


@dataclass
class CurveResult:
    auroc: float
    ap: float
    f1_max: float
    aupro: float = math.nan


def _group(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and their counts of an ascending array."""
    if sorted_keys.size == 0:
        return sorted_keys, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], starts])
    counts = np.diff(np.append(starts, sorted_keys.size))
    return sorted_keys[starts], counts


def _merge(nk: np.ndarray, nc: np.ndarray, pk: np.ndarray, pc: np.ndarray,
           pw: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Merge distinct negative keys (+counts) with distinct positive keys (+counts, +weights).

    Both key arrays are sorted and duplicate-free, the positive one small. Returns the merged keys
    with negative counts, positive counts and positive weights per key (zeros where absent).
    """
    if pk.size == 0:
        z = np.zeros(nk.size, np.int64)
        return nk, nc, z, (np.zeros(nk.size) if pw is not None else None)
    idx = np.searchsorted(nk, pk)
    present = (idx < nk.size) & (nk[np.minimum(idx, nk.size - 1)] == pk) if nk.size else np.zeros(pk.size, bool)
    new = ~present
    n_new = int(new.sum())
    total = nk.size + n_new
    # Where each new key lands in the merged array, and where the old ones move to.
    new_pos = idx[new] + np.arange(n_new)
    is_new = np.zeros(total, bool)
    is_new[new_pos] = True
    old_pos = np.flatnonzero(~is_new)
    keys = np.empty(total, nk.dtype)
    keys[old_pos] = nk
    keys[new_pos] = pk[new]
    negc = np.zeros(total, np.int64)
    negc[old_pos] = nc
    pos_at = np.empty(pk.size, np.int64)
    pos_at[new] = new_pos
    pos_at[present] = old_pos[idx[present]] if present.any() else pos_at[present]
    posc = np.zeros(total, np.int64)
    posc[pos_at] = pc
    wsum = None
    if pw is not None:
        wsum = np.zeros(total, np.float64)
        wsum[pos_at] = pw
    return keys, negc, posc, wsum


def curve_metrics(neg_keys: np.ndarray, pos_keys: np.ndarray, pos_weights: Optional[np.ndarray] = None,
                  chunk: int = 1 << 22) -> CurveResult:
    """Exact metrics from negative keys (sorted in place) and positive keys (+ PRO weight each).

    ``pos_weights`` (float64, one per positive) are the AUPRO increments 1 / (|C_k| * K); omit them
    for image-level metrics. Returns NaN for every metric that is undefined (no positive or no
    negative sample).
    """
    n_neg, n_pos = int(neg_keys.size), int(pos_keys.size)
    if n_neg == 0 or n_pos == 0:
        return CurveResult(math.nan, math.nan, math.nan, math.nan)
    neg_keys.sort()
    order = np.argsort(pos_keys, kind="stable")
    pk = pos_keys[order]
    pw = pos_weights[order] if pos_weights is not None else None

    auroc = ap = 0.0
    f1 = 0.0
    pro_area, pro_done = 0.0, pos_weights is None
    tp = fp = 0                     # running counts (python ints: exact)
    pro = 0.0
    prev_fpr = prev_tpr = 0.0
    prev_pro_fpr = prev_pro = 0.0
    hi_n, hi_p = n_neg, n_pos       # unprocessed prefix ends (ascending arrays, we walk downwards)
    while hi_n > 0 or hi_p > 0:
        # Next chunk of negatives, cut at a tie-group boundary; the positives with keys in range.
        if hi_n > 0:
            lo_n = max(0, hi_n - chunk)
            if lo_n > 0:
                lo_n = int(np.searchsorted(neg_keys[:hi_n], neg_keys[lo_n], side="left"))
            floor_key = neg_keys[lo_n] if lo_n > 0 else None
        else:
            lo_n, floor_key = 0, None
        if floor_key is None:
            lo_p = 0
        else:
            lo_p = int(np.searchsorted(pk[:hi_p], floor_key, side="left"))
        nk, nc = _group(neg_keys[lo_n:hi_n])
        pkc, pc = _group(pk[lo_p:hi_p])
        w_per_key = None
        if not pro_done and pkc.size:
            starts = np.concatenate([[0], np.flatnonzero(np.diff(pk[lo_p:hi_p])) + 1])
            w_per_key = np.add.reduceat(pw[lo_p:hi_p], starts)
        elif not pro_done:
            w_per_key = np.zeros(0)
        keys, negc, posc, wsum = _merge(nk, nc, pkc, pc, w_per_key)
        # Descending thresholds.
        negc, posc = negc[::-1], posc[::-1]
        tps = tp + np.cumsum(posc)
        fps = fp + np.cumsum(negc)
        fpr = fps / n_neg
        tpr = tps / n_pos
        # AUROC: trapezoids between consecutive distinct thresholds.
        fpr_prev = np.concatenate([[prev_fpr], fpr[:-1]])
        tpr_prev = np.concatenate([[prev_tpr], tpr[:-1]])
        auroc += float(np.sum((fpr - fpr_prev) * (tpr + tpr_prev)) / 2.0)
        # AP (step-wise) and F1-max.
        precision = tps / (tps + fps)
        ap += float(np.sum((tpr - tpr_prev) * precision))
        denom = precision + tpr
        with np.errstate(invalid="ignore", divide="ignore"):
            f1s = np.where(denom > 0, 2 * precision * tpr / np.where(denom > 0, denom, 1), 0.0)
        f1 = max(f1, float(f1s.max(initial=0.0)))
        # AUPRO, until the FPR limit is passed.
        if not pro_done:
            pros = pro + np.cumsum(wsum[::-1])
            xs = np.concatenate([[prev_pro_fpr], fpr])
            ys = np.concatenate([[prev_pro], pros])
            over = np.flatnonzero(xs > FPR_LIMIT)
            if over.size:
                j = int(over[0])
                x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
                y_lim = y0 + (y1 - y0) * (FPR_LIMIT - x0) / (x1 - x0)
                xs = np.concatenate([xs[:j], [FPR_LIMIT]])
                ys = np.concatenate([ys[:j], [y_lim]])
                pro_done = True
            pro_area += float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)
            pro = float(pros[-1])
            prev_pro_fpr, prev_pro = float(fpr[-1]), pro
        tp, fp = int(tps[-1]), int(fps[-1])
        prev_fpr, prev_tpr = float(fpr[-1]), float(tpr[-1])
        hi_n, hi_p = lo_n, lo_p
    aupro = math.nan
    if pos_weights is not None:
        if not pro_done:  # the curve ends at FPR = 1 >= 0.3, so this cannot happen; keep it safe
            raise AssertionError("AUPRO curve did not reach the FPR limit")
        aupro = pro_area / FPR_LIMIT
    return CurveResult(auroc=auroc, ap=ap, f1_max=f1, aupro=aupro)


# ------------------------------------------------------------------------------------------
# Per-class accumulation
# ------------------------------------------------------------------------------------------

@dataclass
class ClassMetrics:
    """Streaming state of one class: image scores and, for pixel metrics, keys and regions."""

    name: str
    pixel: bool = True
    image_scores: list = field(default_factory=list)
    image_labels: list = field(default_factory=list)
    _neg: list = field(default_factory=list)      # uint32 keys of background pixels
    _pos: list = field(default_factory=list)      # uint32 keys of region pixels
    _reg: list = field(default_factory=list)      # int32 global region id of each region pixel
    _sizes: list = field(default_factory=list)    # int64 pixel count of each region
    n_regions: int = 0
    n_masks: int = 0
    pixel_excluded: int = 0                       # anomalous images without a mask: no pixel ground truth
    batches: int = 0

    def add(self, image_scores, labels, maps=None, masks=None, batch: int | str | None = None,
            has_mask=None) -> None:
        """Add a batch: image scores (B,), labels (B,), and optionally maps (B,H,W) with masks (B,H,W).

        ``has_mask`` (B,) says which images have a ground-truth mask. An anomalous image without
        one has no known pixel labels (its defect is somewhere, its mask is blank), so its pixels
        are left out of every pixel metric rather than counted as normal; it still counts for the
        image metrics. Omitted, every mask is taken as ground truth.
        """
        where = f"class '{self.name}', batch {batch if batch is not None else self.batches}"
        s = _np(image_scores).astype(np.float32, copy=False).reshape(-1)
        y = _np(labels).reshape(-1)
        if s.shape != y.shape:
            raise MetricInputError(f"{where}: {s.size} image scores for {y.size} labels")
        if not np.isfinite(s).all():
            raise MetricInputError(f"{where}: image scores hold NaN or inf")
        self.image_scores.append(s.copy())
        self.image_labels.append(y.astype(bool))
        if maps is not None and self.pixel:
            m = _np(maps)
            if m.dtype not in (np.float16, np.float32):
                m = m.astype(np.float32)
            g = _np(masks) if masks is not None else None
            if g is None:
                raise MetricInputError(f"{where}: anomaly maps given without masks")
            if m.shape != g.shape or m.ndim != 3:
                raise MetricInputError(f"{where}: maps {tuple(m.shape)} and masks {tuple(g.shape)} must both be (B,H,W)")
            if m.shape[0] != s.size:
                raise MetricInputError(f"{where}: {m.shape[0]} maps for {s.size} images")
            if not np.isfinite(m).all():
                raise MetricInputError(f"{where}: anomaly maps hold NaN or inf")
            g = g.astype(bool, copy=False)
            keys = sortable_keys(m)
            known = _pixel_truth_known(y, has_mask, where)
            for i in range(m.shape[0]):
                if not known[i]:
                    self.pixel_excluded += 1
                    continue
                gi = g[i]
                if not gi.any():
                    self._neg.append(keys[i].reshape(-1))
                    continue
                regions, n = label_regions(gi)
                self._neg.append(keys[i][~gi])
                self._pos.append(keys[i][gi])
                self._reg.append(regions[gi] - 1 + self.n_regions)
                self._sizes.append(np.bincount(regions[gi], minlength=n + 1)[1:].astype(np.int64))
                self.n_regions += n
                self.n_masks += 1
        self.batches += 1

    # -- results --------------------------------------------------------------------------
    def image_metrics(self) -> CurveResult:
        s = np.concatenate(self.image_scores) if self.image_scores else np.zeros(0, np.float32)
        y = np.concatenate(self.image_labels) if self.image_labels else np.zeros(0, bool)
        k = sortable_keys(s)
        return curve_metrics(k[~y].copy(), k[y])

    def pixel_metrics(self) -> CurveResult:
        if not self._neg and not self._pos:
            return CurveResult(math.nan, math.nan, math.nan, math.nan)
        neg = np.concatenate(self._neg) if self._neg else np.zeros(0, np.uint32)
        self._neg = [neg]  # one buffer, sorted in place below (compute may be called again)
        pos = np.concatenate(self._pos) if self._pos else np.zeros(0, np.uint32)
        if self.n_regions == 0:
            return curve_metrics(neg, pos)
        reg = np.concatenate(self._reg)
        sizes = np.concatenate(self._sizes)
        weights = 1.0 / (sizes[reg].astype(np.float64) * self.n_regions)
        return curve_metrics(neg, pos, weights)

    def arrays(self) -> dict:
        """The raw state, for the paper-compatible variants."""
        return {"neg": np.concatenate(self._neg) if self._neg else np.zeros(0, np.uint32),
                "pos": np.concatenate(self._pos) if self._pos else np.zeros(0, np.uint32),
                "reg": np.concatenate(self._reg) if self._reg else np.zeros(0, np.int32),
                "sizes": np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int64)}

    def compute(self) -> dict[str, float]:
        img = self.image_metrics()
        out = {"image_auroc": img.auroc, "image_ap": img.ap, "image_f1_max": img.f1_max}
        if self.pixel:
            px = self.pixel_metrics()
            out.update(pixel_auroc=px.auroc, pixel_ap=px.ap, pixel_f1_max=px.f1_max, pixel_aupro=px.aupro)
        return out

    def state(self) -> dict:
        """Picklable state for gathering across ranks."""
        return {k: getattr(self, k) for k in ("name", "pixel", "image_scores", "image_labels", "_neg", "_pos",
                                               "_reg", "_sizes", "n_regions", "n_masks", "pixel_excluded",
                                               "batches")}

    def merge(self, other: "ClassMetrics | dict") -> None:
        """Append another accumulator's state (region ids are re-numbered after ours)."""
        st = other.state() if isinstance(other, ClassMetrics) else other
        self.image_scores += st["image_scores"]
        self.image_labels += st["image_labels"]
        self._neg += st["_neg"]
        self._pos += st["_pos"]
        self._reg += [r + self.n_regions for r in st["_reg"]]
        self._sizes += st["_sizes"]
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
