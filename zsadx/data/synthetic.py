"""Synthetic downloads: small fake datasets in each dataset's real raw layout and file formats.

The painting primitives live in :mod:`zsadx.data.drawing` (re-exported here for existing callers);
each dataset plug-in writes them into its own folder layout (``DatasetPlugin.synthesize``), next to
the parser of that layout, and returns what it planted. ``make_raw`` is the entry point used by the
tests (generate, convert, compare with what was planted) and by the demo; it sits above the plug-in
registry, which the plug-ins never import.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zsadx.data.convert.plugins import load_all
from zsadx.data.drawing import paste_defect, sample, save, save_mask, texture  # noqa: F401 - public names


def make_raw(dataset: str, root: str | Path, seed: int = 0, n: int = 1):
    """Write a synthetic download of ``dataset`` under ``root``; return the planted items.

    ``n`` scales the number of images per group (class x split x label).
    """
    plugin = load_all().get(dataset)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return plugin.synthesize(root, np.random.default_rng(seed), n=n)
