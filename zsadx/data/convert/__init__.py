"""Raw-layout converters: importing this package registers every dataset plug-in."""
from zsadx.data.convert import (bmad, classification, cut, dagm, folder, image_mask,  # noqa: F401
                                mvtec_style, visa)
from zsadx.data.convert.base import LayoutError, convert, format_summary  # noqa: F401
