"""The method registry. Each method module registers itself here when imported."""
from zsadx.registry import Registry

METHODS: Registry = Registry("method")


def load_all() -> Registry:
    """Import every method module so that the registry is complete."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return METHODS
