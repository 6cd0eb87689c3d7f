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


def convert(src, dst, format: str = "qcow2", **kw):
    """Convert an image (path, `FILE:partN`, `FILE:lvm:LV`, image, partition or reader)
    into a new image; see imgscope.conversion.pipeline.convert for the options."""
    from .conversion.pipeline import convert as _convert
    return _convert(src, dst, format, **kw)


def create(path, format: str, size=None, options=None, backing=None, backing_format=None,
           **kw):
    """A new empty image, like qemu-img create (size may come from the backing file)."""
    from .conversion.pipeline import create as _create
    return _create(path, format, size, options, backing, backing_format, **kw)


def compare(a, b, **kw):
    """Compare two images' guest disks like qemu-img compare (a CompareResult)."""
    from .conversion.compare import compare_images
    return compare_images(a, b, **kw)


def explore(image_or_path, **kw):
    """An interactive explorer (ipywidgets) over an image or a path: summary, header fields,
    every table paged, extents, regions, findings, hex view and translation stepper."""
    from .widgets import explore as _explore
    return _explore(image_or_path, **kw)


def resize(path, size, **kw):
    """Grow (or with shrink=True shrink) an image to `size` ("+1G", "-512M", "10G")."""
    from .conversion.resize import resize_image
    return resize_image(path, str(size), **kw)


__all__ = ["convert", "create", "compare", "resize", "explore", "open", "probe", "Limits", "ImageError", "UnknownFormat", "ParseError",
           "Truncated", "Unsupported", "UnsafePath", "LimitExceeded", "ChainError",
           "RepairError", "ConvertError", "__version__"]
