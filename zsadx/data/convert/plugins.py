"""The registry of dataset plug-ins: every converter module's ``PLUGINS``, by name and alias.

Imports run one way: this module imports the converter modules, which import only
``convert.base``, the catalog entry and the drawing helpers -- never this registry.
"""
from __future__ import annotations

from zsadx.data.catalog import DatasetEntry
from zsadx.data.convert import bmad, classification, cut, dagm, folder, image_mask, mvtec_style, visa
from zsadx.data.convert.base import DatasetPlugin
from zsadx.registry import Registry

_MODULES = (mvtec_style, visa, classification, cut, dagm, image_mask, bmad, folder)


def _build() -> Registry:
    reg: Registry = Registry("dataset")
    for module in _MODULES:
        for plugin in module.PLUGINS:
            reg.register(plugin.entry.name, plugin, aliases=plugin.entry.aliases)
    return reg


DATASETS: Registry = _build()


def load_all() -> Registry:
    """Every dataset plug-in (``zsadx.data.convert.base.DatasetPlugin``), by name and alias."""
    return DATASETS


def get_plugin(name: str) -> DatasetPlugin:
    return DATASETS.get(name)


def get_entry(name: str) -> DatasetEntry:
    return DATASETS.get(name).entry


def class_coverage(dataset: str, held) -> dict:
    """Which classes a converted or sharded dataset holds, against its catalog.

    ``{"classes": held (sorted), "catalog_classes": the catalog's, "missing_classes": catalog minus
    held, "subset": whether any is missing}``. A dataset zsadx does not know, or whose classes come
    from the download (``folder``), is complete by definition: catalog_classes = held.
    """
    held = sorted(set(held))
    entry = DATASETS.get(dataset).entry if dataset in DATASETS else None
    catalog = list(entry.classes) if entry is not None and entry.fixed_classes else held
    missing = [c for c in catalog if c not in set(held)]
    return {"classes": held, "catalog_classes": catalog, "missing_classes": missing, "subset": bool(missing)}
