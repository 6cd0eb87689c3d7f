"""imgscope: look inside virtual-machine disk images.

    import imgscope
    img = imgscope.open("disk.qcow2")
    img.fields, img.tables, img.extents(), img.regions(), img.open_guest()

Importing imgscope is light: pandas and matplotlib load only when a frame or
picture is asked for.
"""
from __future__ import annotations

from .errors import (ImageError, UnknownFormat, ParseError, Truncated, Unsupported,
                     UnsafePath, LimitExceeded, ChainError, RepairError, ConvertError)
from .limits import Limits

__version__ = "0.1.0"


def open(path, format: str | None = None, *, strict: bool = False,
         allow_paths=None, limits: Limits | None = None):
    """Open an image read-only and parse it into the common model (an Image)."""
    from .formats import open_image
    return open_image(path, format, strict=strict, allow_paths=allow_paths, limits=limits)


def probe(path):
    """Ranked format candidates for a file, each with the reason it matched."""
    from .formats import probe_path
    return probe_path(path)


__all__ = ["open", "probe", "Limits", "ImageError", "UnknownFormat", "ParseError",
           "Truncated", "Unsupported", "UnsafePath", "LimitExceeded", "ChainError",
           "RepairError", "ConvertError", "__version__"]
