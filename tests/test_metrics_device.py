"""Metric state on a torch device (``ClassMetrics(..., device=...)``): the same values as the host
(numpy) path to 1e-9 and as scikit-learn, tested on CPU tensors through the device code path; the
state for gathering across ranks stays host numpy whatever the device."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from test_metrics import random_class, reference_aupro, sk_f1_max
from zsadx.eval.metrics import METRIC_NAMES, ClassMetrics, MetricInputError, _NUMPY, _TorchOps, levels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fill(acc: ClassMetrics, masks, maps, labels, scores, has_mask=None, step=3, as_torch=True):
    for lo in range(0, len(masks), step):
        part = slice(lo, lo + step)
        args = (scores[part], labels[part], maps[part], masks[part])
        if as_torch:
            args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in args)
        acc.add(*args, has_mask=None if has_mask is None else has_mask[part])
    return acc


def assert_same(got: dict, want: dict, rel=1e-9):
    assert set(got) == set(want)
    for k in want:
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-12), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels_", [None, 7])
def test_device_path_equals_host_path_and_sklearn(device, seed, levels_):
    rng = np.random.default_rng(40 + seed)
    masks, maps = random_class(rng, n_img=7, levels=levels_, dtype=np.float16 if seed % 3 == 0 else np.float32)
    labels = masks.reshape(len(masks), -1).any(1)
    scores = maps.reshape(len(maps), -1).max(1)
    host = fill(ClassMetrics("c"), masks, maps, labels, scores, as_torch=False).compute()
    dev = fill(ClassMetrics("c", device=device), masks, maps, labels, scores).compute()
    assert_same(dev, host)
    y, s = masks.ravel(), maps.astype(np.float32).ravel()
    assert dev["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), rel=1e-9)
    assert dev["pixel_ap"] == pytest.approx(average_precision_score(y, s), rel=1e-9)
    assert dev["pixel_f1_max"] == pytest.approx(sk_f1_max(y, s), rel=1e-9)
    assert dev["pixel_aupro"] == pytest.approx(reference_aupro(masks, maps.astype(np.float32)), rel=1e-9)
    assert dev["image_auroc"] == pytest.approx(roc_auc_score(labels, scores.astype(np.float32)), rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_device_levels_are_the_host_levels_exactly(device):
    rng = np.random.default_rng(7)
    scores = np.round(rng.random(5000) * 40).astype(np.float32) / 40  # heavy ties
    scores[:50] = -0.0
    scores[50:100] = 0.0
    pos = scores[rng.random(5000) < 0.2]
    weights = rng.random(pos.size)
    want = levels(_NUMPY, np.sort(scores), pos, weights, holds_positives=True)
    ops = _TorchOps(device)
    got = levels(ops, ops.sort(torch.from_numpy(scores).to(device)), torch.from_numpy(pos).to(device),
                 torch.from_numpy(weights).to(device), holds_positives=True)
    for field in ("pos_below", "neg_ge", "neg_gt"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    np.testing.assert_allclose(got.pro_ge, want.pro_ge, rtol=1e-12, atol=1e-15)
    # -0.0 and +0.0 are one level (one tie), on both paths
    assert got.pos_below.size == np.unique(pos).size and got.n_neg == want.n_neg == scores.size - pos.size


@pytest.mark.parametrize("device", DEVICES)
def test_device_state_is_host_numpy_and_merges_across_paths(device):
    rng = np.random.default_rng(11)
    masks, maps = random_class(rng, n_img=9)
    labels = masks.reshape(9, -1).any(1)
    scores = maps.reshape(9, -1).mean(1)
    whole = fill(ClassMetrics("c"), masks, maps, labels, scores, as_torch=False).compute()
    a, b = ClassMetrics("c", device=device), ClassMetrics("c", device=device)
    fill(a, masks[:4], maps[:4], labels[:4], scores[:4])
    fill(b, masks[4:], maps[4:], labels[4:], scores[4:])
    st = b.state()
    # what torch.distributed.gather_object pickles: host numpy only, no tensor of any device
    leaves = [x for v in st.values() if isinstance(v, list) for x in v]
    assert leaves and all(isinstance(x, np.ndarray) for x in leaves)
    st = pickle.loads(pickle.dumps(st))
    on_device = ClassMetrics("c", device=device)
    on_device.merge(a.state())
    on_device.merge(st)
    assert isinstance(on_device._all.pieces()[0], torch.Tensor)
    assert_same(on_device.compute(), whole)
    on_host = ClassMetrics("c")            # a numpy rank 0 takes a device rank's state too
    on_host.merge(a.state())
    on_host.merge(st)
    assert_same(on_host.compute(), whole)
    assert on_host.n_regions == on_device.n_regions == a.n_regions + b.n_regions


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_leaves_mask_less_anomalies_out_like_the_host_path(device):
    rng = np.random.default_rng(5)
    masks, maps = random_class(rng, n_img=6)
    labels = masks.reshape(6, -1).any(1)
    labels[0] = True                          # anomalous, blank mask, no ground truth
    has_mask = labels & masks.reshape(6, -1).any(1)
    scores = maps.reshape(6, -1).max(1)
    host = fill(ClassMetrics("c"), masks, maps, labels, scores, has_mask=has_mask, as_torch=False)
    dev = fill(ClassMetrics("c", device=device), masks, maps, labels, scores, has_mask=torch.from_numpy(has_mask))
    assert_same(dev.compute(), host.compute())
    assert dev.pixel_excluded == host.pixel_excluded == 1


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_bad_input_and_degenerate_classes(device):
    acc = ClassMetrics("bottle", device=device)
    with pytest.raises(MetricInputError, match="class 'bottle', batch 2: anomaly maps hold NaN"):
        acc.add(torch.tensor([0.1]), torch.tensor([0]), torch.full((1, 4, 4), float("nan")),
                torch.zeros(1, 4, 4), batch=2)
    with pytest.raises(MetricInputError, match="image scores hold NaN or inf"):
        acc.add(torch.tensor([float("inf")]), torch.tensor([0]))
    acc.add(torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    got = acc.compute()
    assert got["image_auroc"] == 1.0 and math.isnan(got["pixel_auroc"]) and math.isnan(got["pixel_aupro"])
    assert set(got) == set(METRIC_NAMES)


def test_merge_refuses_a_state_of_another_format():
    acc = ClassMetrics("screw")
    old = {k: v for k, v in ClassMetrics("screw").state().items() if k != "format"}
    with pytest.raises(MetricInputError, match="class 'screw': metric state of format 1"):
        acc.merge(old)
