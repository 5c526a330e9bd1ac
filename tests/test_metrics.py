"""Metrics: equal to scikit-learn and to an independent per-threshold AUPRO, on awkward inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from zsadx.eval.metrics import ClassMetrics, MetricInputError, curve_metrics, mean_over_classes, sortable_keys


def sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f1 = 2 * p * r / (p + r)
    return np.nanmax(f1[np.isfinite(f1)])


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Independent definition: loop over every distinct threshold (s >= t), 8-connected regions."""
    # Build per-image region lists with their image index.
    per = []
    for idx, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        per += [(idx, lab == k) for k in range(1, n + 1)]
    bg = ~masks.astype(bool)
    n_bg = bg.sum()
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & bg).sum() / n_bg
        pro = np.mean([above[idx][r].mean() for idx, r in per])
        pts.append((fpr, pro))
    xs, ys = np.array(pts).T
    j = np.flatnonzero(xs > limit)[0]
    y_lim = ys[j - 1] + (ys[j] - ys[j - 1]) * (limit - xs[j - 1]) / (xs[j] - xs[j - 1])
    xs, ys = np.append(xs[:j], limit), np.append(ys[:j], y_lim)
    return float(np.trapezoid(ys, xs) / limit)


def random_class(rng, n_img=6, size=24, levels=None, dtype=np.float32):
    masks = np.zeros((n_img, size, size), bool)
    for i in range(n_img):
        if i % 3 == 0:
            continue  # some normal images
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(1, 5, 2)
            yy, xx = np.mgrid[:size, :size]
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = rng.random(masks.shape) + 0.8 * masks * rng.random()
    maps = ndimage.gaussian_filter(maps, (0, 1, 1))
    if levels:  # quantise to force many ties
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(dtype)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("levels", [None, 7, 50])
def test_pixel_metrics_equal_references(seed, levels):
    rng = np.random.default_rng(seed)
    masks, maps = random_class(rng, levels=levels, dtype=np.float16 if seed % 4 == 0 else np.float32)
    acc = ClassMetrics("c")
    labels = masks.reshape(len(masks), -1).any(1)
    scores = maps.reshape(len(maps), -1).max(1)
    for lo in range(0, len(masks), 4):  # several batches
        acc.add(scores[lo:lo + 4], labels[lo:lo + 4], maps[lo:lo + 4], masks[lo:lo + 4])
    got = acc.compute()
    y, s = masks.ravel(), maps.astype(np.float32).ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert got["pixel_f1_max"] == pytest.approx(sk_f1_max(y, s), abs=1e-6)
    assert got["pixel_aupro"] == pytest.approx(reference_aupro(masks, maps.astype(np.float32)), abs=1e-6)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_curve_metrics_heavy_ties_and_signed_zeros(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 400))
    y = rng.random(n) < rng.uniform(0.05, 0.95)
    if y.all() or not y.any():
        y[0], y[-1] = True, False
    s = rng.integers(0, int(rng.integers(1, 30)), n).astype(np.float32) * rng.choice([1, -1.0])
    s[rng.random(n) < 0.1] = -0.0  # signed zeros are ties
    k = sortable_keys(s)
    res = curve_metrics(k[~y].copy(), k[y])
    assert res.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert res.ap == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert res.f1_max == pytest.approx(sk_f1_max(y, s), abs=1e-9)


def test_tiny_and_degenerate_classes():
    acc = ClassMetrics("all-anomalous")
    acc.add([0.1, 0.9], [1, 1])
    assert math.isnan(acc.compute()["image_auroc"])  # undefined, never 0
    one = ClassMetrics("one-each")
    one.add([0.2, 0.7], [0, 1])
    assert one.compute()["image_auroc"] == 1.0
    tie = ClassMetrics("tie")
    tie.add([0.5, 0.5], [0, 1])
    assert tie.compute()["image_auroc"] == 0.5
    empty = ClassMetrics("no-masks")
    empty.add([0.1, 0.2], [0, 1], np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), bool))
    m = empty.compute()
    assert math.isnan(m["pixel_auroc"]) and math.isnan(m["pixel_aupro"]) and m["image_auroc"] == 1.0


def test_bad_input_names_class_and_batch():
    acc = ClassMetrics("bottle")
    with pytest.raises(MetricInputError, match="class 'bottle', batch 3: anomaly maps hold NaN"):
        acc.add([0.1], [0], np.full((1, 4, 4), np.nan, np.float32), np.zeros((1, 4, 4)), batch=3)
    with pytest.raises(MetricInputError, match="class 'bottle', batch 0: image scores hold NaN or inf"):
        acc.add([np.inf], [0])
    with pytest.raises(MetricInputError, match=r"maps \(1, 4, 4\) and masks \(1, 5, 5\)"):
        acc.add([0.1], [0], np.zeros((1, 4, 4), np.float32), np.zeros((1, 5, 5)))
    with pytest.raises(MetricInputError, match="2 image scores for 1 labels"):
        acc.add([0.1, 0.2], [0])


def test_mean_over_classes_skips_and_flags_undefined():
    mean, undefined = mean_over_classes({"a": {"image_auroc": 0.8, "pixel_auroc": 0.9},
                                         "b": {"image_auroc": math.nan, "pixel_auroc": 0.7}})
    assert mean["image_auroc"] == 0.8 and mean["pixel_auroc"] == pytest.approx(0.8)
    assert undefined == {"image_auroc": ["b"]}


def test_merge_equals_single_accumulator():
    rng = np.random.default_rng(3)
    masks, maps = random_class(rng, n_img=8)
    labels = masks.reshape(8, -1).any(1)
    scores = maps.reshape(8, -1).mean(1)
    whole = ClassMetrics("c")
    whole.add(scores, labels, maps, masks)
    a, b = ClassMetrics("c"), ClassMetrics("c")
    a.add(scores[:5], labels[:5], maps[:5], masks[:5])
    b.add(scores[5:], labels[5:], maps[5:], masks[5:])
    a.merge(b.state())
    assert a.compute() == pytest.approx(whole.compute())


def test_float32_counts_would_stall_but_ours_do_not():
    # 2^24 + 3 negatives with a handful of positives: counts must stay exact (int64).
    n = (1 << 24) + 3
    neg = np.full(n, sortable_keys(np.array([0.5], np.float32))[0], np.uint32)
    neg[:3] = sortable_keys(np.array([0.9], np.float32))[0]
    pos = sortable_keys(np.array([0.7, 0.95], np.float32))
    res = curve_metrics(neg, pos)
    # Positive 0.95 beats all; 0.7 beats all but the 3 negatives at 0.9.
    assert res.auroc == pytest.approx((n + (n - 3)) / (2 * n), abs=1e-12)


def official_anomalyclip_pro(masks, amaps, max_step=200, expect_fpr=0.3):
    """The official loop, re-expressed (scipy's full-connectivity labels = skimage's default)."""
    from sklearn.metrics import auc

    binary = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary[amaps <= th], binary[amaps > th] = 0, 1
        pro = []
        for b, m in zip(binary, masks):
            lab, n = ndimage.label(m, structure=np.ones((3, 3)))
            for k in range(1, n + 1):
                r = lab == k
                pro.append(b[r].sum() / r.sum())
        inv = 1 - masks
        fprs.append(np.logical_and(inv, binary).sum() / inv.sum())
        pros.append(np.mean(pro))
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return auc(f, pros[keep])


@pytest.mark.parametrize("seed", range(4))
def test_paper_compat_anomalyclip_pro_matches_official_loop(seed):
    from zsadx.eval.paper_compat import anomalyclip_pro

    rng = np.random.default_rng(seed)
    masks, maps = random_class(rng, n_img=5, size=20)
    acc = ClassMetrics("c")
    acc.add(maps.reshape(5, -1).max(1), masks.reshape(5, -1).any(1), maps, masks)
    want = official_anomalyclip_pro(masks.astype(np.uint8), maps)
    assert anomalyclip_pro(acc) == pytest.approx(want, abs=1e-9)
    assert anomalyclip_pro(acc) != pytest.approx(acc.compute()["pixel_aupro"], abs=1e-4)  # a different number


def test_signed_zeros_and_ties_in_maps_are_ties():
    rng = np.random.default_rng(21)
    masks, maps = random_class(rng, n_img=6, levels=5)
    maps -= np.float32(0.6)                       # negative scores, and zeros of both signs
    maps[np.abs(maps) < 0.05] = -0.0
    maps[:, :2] = 0.0
    acc = ClassMetrics("c")
    acc.add(maps.reshape(6, -1).max(1), masks.reshape(6, -1).any(1), maps, masks)
    got = acc.compute()
    y, s = masks.ravel(), maps.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), rel=1e-12)
    assert got["pixel_f1_max"] == pytest.approx(sk_f1_max(y, s), rel=1e-12)
    assert got["pixel_aupro"] == pytest.approx(reference_aupro(masks, maps), rel=1e-9)


def test_curve_metrics_take_float_scores_as_well_as_keys():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=3000), 1).astype(np.float32)
    y = rng.random(3000) < 0.3
    from_floats = curve_metrics(s[~y].copy(), s[y])
    k = sortable_keys(s)
    from_keys = curve_metrics(k[~y].copy(), k[y])
    assert from_floats == from_keys
    assert from_floats.auroc == pytest.approx(roc_auc_score(y, s), rel=1e-12)


def test_state_taken_mid_run_stays_intact_and_compute_repeats():
    # The pixel scores grow in one buffer; a state handed out must not be moved or overwritten
    # by later batches, and computing twice (or adding after computing) gives the right values.
    rng = np.random.default_rng(8)
    masks, maps = random_class(rng, n_img=9, size=32)
    labels = masks.reshape(9, -1).any(1)
    scores = maps.reshape(9, -1).max(1)
    acc = ClassMetrics("c")
    acc.add(scores[:3], labels[:3], maps[:3], masks[:3])
    st = acc.state()
    snapshot = [a.copy() for a in st["_all"]]
    acc.add(scores[3:6], labels[3:6], maps[3:6], masks[3:6])
    first = acc.compute()
    assert first == acc.compute()
    acc.add(scores[6:], labels[6:], maps[6:], masks[6:])
    assert all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(st["_all"], snapshot))
    whole = ClassMetrics("c")
    whole.add(scores, labels, maps, masks)
    assert acc.compute() == pytest.approx(whole.compute(), rel=1e-12)
    early = ClassMetrics("c")
    early.merge(st)
    part = ClassMetrics("c")
    part.add(scores[:3], labels[:3], maps[:3], masks[:3])
    assert early.compute() == pytest.approx(part.compute(), rel=1e-12)


def test_regions_are_labelled_within_each_masks_box_as_on_the_whole_image():
    from zsadx.eval.metrics import label_regions, region_ids

    rng = np.random.default_rng(4)
    masks, _ = random_class(rng, n_img=7, size=40)
    masks[1] = False
    masks[2, 0, 0] = masks[2, 1, 1] = masks[2, 39, 39] = True   # diagonal neighbours: one region (8-connected)
    ids, sizes = region_ids(masks)
    want_ids, want_sizes, n = [], [], 0
    for m in masks:
        lab, k = label_regions(m)
        want_ids.append(lab[m] - 1 + n)
        want_sizes.append(np.bincount(lab[m], minlength=k + 1)[1:])
        n += k
    assert np.array_equal(ids, np.concatenate(want_ids)) and np.array_equal(sizes, np.concatenate(want_sizes))
    assert ids.size == masks.sum() and sizes.sum() == masks.sum()


@pytest.mark.parametrize("hint", [None, 0, 100, "exact", 10**7])  # none, too small, exact, far too big
def test_score_buffer_sized_from_a_hint_or_grown_keeps_every_score_once(hint):
    # The pixel scores go into one buffer, allocated from the caller's size hint (the evaluator's,
    # from the index) or grown; a wrong hint costs growth or spare room, never a score.
    rng = np.random.default_rng(9)
    masks, maps = random_class(rng, n_img=12, size=20)
    labels = masks.reshape(12, -1).any(1)
    scores = maps.reshape(12, -1).max(1)
    kw = {} if hint is None else {"expected_pixels": maps.size if hint == "exact" else hint}
    acc = ClassMetrics("grow", **kw)
    for lo in range(0, 12, 2):
        acc.add(scores[lo:lo + 2], labels[lo:lo + 2], maps[lo:lo + 2], masks[lo:lo + 2])
        if lo == 4:
            st = acc.state()  # a view lent out mid-run: later growth must copy, not move it
    (kept,) = acc.state()["_all"]
    assert np.array_equal(kept, maps.reshape(-1))
    assert np.array_equal(st["_all"][0], maps[:6].reshape(-1))
    m = acc.compute()
    assert acc._all._buf.size == maps.size  # spare room given back before the sort
    assert np.array_equal(st["_all"][0], maps[:6].reshape(-1))  # the mid-run state kept its scores
    assert np.array_equal(np.sort(kept), np.sort(maps.reshape(-1)))
    # A state taken only at the end (as the evaluator does, just before computing) is sorted where
    # it lies, not copied: the same scores, reordered, and no second buffer of the pixels' size.
    last = ClassMetrics("grow", **kw)
    last.add(scores, labels, maps, masks)
    (whole,) = last.state()["_all"]
    assert last.compute() == m
    assert np.shares_memory(last._all._buf, whole) and np.array_equal(whole, np.sort(maps.reshape(-1)))
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), rel=1e-12)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), rel=1e-12)


def test_finite_check_tells_overflowing_sums_from_nan_and_inf():
    # Maps are checked through their float32 sum: huge finite scores overflow it to inf and must
    # still pass; a single NaN or inf anywhere must not.
    big = np.full((1, 4, 4), 3e38, np.float32)
    acc = ClassMetrics("big")
    acc.add([0.1], [0], big, np.zeros((1, 4, 4), bool))
    for bad in (np.nan, np.inf, -np.inf):
        maps = big.copy()
        maps[0, 3, 2] = bad
        with pytest.raises(MetricInputError, match="anomaly maps hold NaN or inf"):
            acc.add([0.1], [0], maps, np.zeros((1, 4, 4), bool))
