"""The seeds' own metric variants, kept apart from the canonical metrics so published numbers can
be reproduced. Nothing here is used unless ``paper_compat`` asks for it.

``anomalyclip_pro``: the PRO of AnomalyCLIP and FAPrompt (credited to cflow-ad): 200 thresholds
evenly spaced from the class's minimum (inclusive) to its maximum (exclusive); at each, pixels
strictly above are positive; PRO = mean covered fraction over the ground-truth regions; FPR over
the background. Points with FPR < 0.3 are kept, their FPR values min-max rescaled to [0, 1], and
the area under PRO is taken with the trapezoid rule -- no interpolation at 0.3, no division by 0.3.
It is computed from the same streaming state as the exact metrics (sorted keys, region ids), with
one ``searchsorted`` and one ``bincount`` per threshold instead of re-labelling every mask 200 times.
"""
from __future__ import annotations

import math

import numpy as np

from zsadx.eval.metrics import ClassMetrics, key_of

_SIGN = np.uint32(0x80000000)


def _value_of(keys: np.ndarray) -> np.ndarray:
    """Inverse of ``sortable_keys``."""
    u = np.where(keys & _SIGN, keys & ~_SIGN, ~keys).astype(np.uint32)
    return u.view(np.float32)


def anomalyclip_pro(acc: ClassMetrics, steps: int = 200, fpr_limit: float = 0.3) -> float:
    st = acc.arrays()
    scores, pos, reg, sizes = np.sort(st["all"]), st["pos"], st["reg"], st["sizes"]
    n_neg = scores.size - pos.size  # the region pixels are among all the pixels
    if sizes.size == 0 or n_neg == 0:
        return math.nan
    # float32 arithmetic throughout, as numpy does on the official float32 maps.
    lo, hi = _value_of(scores[:1])[0], _value_of(scores[-1:])[0]
    delta = (hi - lo) / np.float32(steps)
    order = np.argsort(pos, kind="stable")
    pos_sorted, reg_sorted = pos[order], reg[order]
    pros, fprs = [], []
    for th in np.arange(lo, hi, delta) if delta > 0 else [lo]:
        k = key_of(float(th))
        first = np.searchsorted(pos_sorted, k, side="right")
        above = scores.size - np.searchsorted(scores, k, side="right")
        fpr = (above - (pos.size - first)) / n_neg
        covered = np.bincount(reg_sorted[first:], minlength=sizes.size)
        pros.append(float(np.mean(covered / sizes)))
        fprs.append(fpr)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2 or fprs.max() == fprs.min():
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # FPR falls as the threshold rises; sklearn.metrics.auc then integrates in the given order and
    # flips the sign. The order matters where FPR values tie, so it is kept, not re-sorted.
    area = float(np.trapezoid(pros, fprs))
    return -area if area < 0 else area
