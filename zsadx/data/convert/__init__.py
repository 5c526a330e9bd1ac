"""Raw-layout converters: the plug-ins (one module per layout family), their registry, the pipeline.

Imports run one way: ``pipeline`` -> ``plugins`` (the registry) -> the plug-in modules ->
``base`` and the catalog entry. Nothing below imports what is above it.
"""
from zsadx.data.convert.base import LayoutError  # noqa: F401
from zsadx.data.convert.pipeline import OutputFolderError, convert, format_summary  # noqa: F401
