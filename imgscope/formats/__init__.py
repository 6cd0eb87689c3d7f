"""Format registry: probing by magic, and opening a file with its driver."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import ImageError, UnknownFormat, Unsupported, ChainError
from ..io.source import Source
from ..limits import Limits
from .probe import Candidate, probe_bytes

# format name -> "module:Class"; formats recognised by probe but absent here
# raise Unsupported naming the format.
DRIVERS = {
    "raw": "imgscope.formats.raw:RawImage",
    "lvm2": "imgscope.formats.raw:RawImage",   # a bare PV is a raw disk (as qemu-img says); .lvm() reads it
    "qcow2": "imgscope.formats.qcow2:Qcow2Image",
    "vmdk": "imgscope.formats.vmdk:VmdkImage",
    "vpc": "imgscope.formats.vhd:VhdImage",
    "vdi": "imgscope.formats.vdi:VdiImage",
    "vhdx": "imgscope.formats.vhdx:VhdxImage",
    "qcow": "imgscope.formats.qcow:QcowImage",
    "cow": "imgscope.formats.cow:CowImage",
}
ALIASES = {"vhd": "vpc", "qcow1": "qcow", "lvm": "lvm2", "file": "raw"}
KNOWN_FORMATS = ("raw", "qcow2", "qcow", "cow", "vmdk", "vdi", "vpc", "vhdx",
                 "ova", "ovf", "vmx", "lvm2")


def probe_source(source: Source) -> list[Candidate]:
    head = source.read_upto(0, 65536)
    tail = source.read_upto(max(0, source.size - 1024), 1024)
    return probe_bytes(head, tail, source.size, source.path.name)


def probe_path(path) -> list[Candidate]:
    with Source(path) as src:
        return probe_source(src)


def driver_class(fmt: str, path: str = ""):
    fmt = ALIASES.get(fmt, fmt)
    target = DRIVERS.get(fmt)
    if target is None:
        if fmt in KNOWN_FORMATS:
            raise Unsupported(f"format '{fmt}' is recognised but not supported yet", path=path)
        raise UnknownFormat(f"unknown format '{fmt}' (known: {', '.join(KNOWN_FORMATS)})",
                            path=path)
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def open_image(path, format: str | None = None, *, strict: bool = False,
               allow_paths=None, limits: Limits | None = None, depth: int = 0,
               seen: frozenset = frozenset()):
    """Open `path` read-only with the named driver, or the best probe match."""
    path = Path(path)
    if path.is_dir():
        raise ImageError("is a directory, not an image", path=str(path))
    source = Source(path)
    try:
        if format is None:
            format = probe_source(source)[0].format
        cls = driver_class(format, str(path))
        return cls(source, strict=strict, allow_paths=allow_paths, limits=limits,
                   depth=depth, seen=seen)
    except BaseException:
        source.close()
        raise


def open_backing(image, name: str, fmt: str | None, structure: str = "backing file"):
    """Open a parent named inside `image`: confined, depth-limited, cycle-checked."""
    from ..io.paths import resolve_named_file
    path = resolve_named_file(name, image.path, image.allow_paths, structure)
    if image.chain_depth + 1 > image.limits.max_chain_depth:
        raise ChainError(f"backing chain deeper than {image.limits.max_chain_depth}",
                         path=str(image.path), structure=structure)
    if str(path) in image._seen:
        raise ChainError(f"backing chain loops back to {path}", path=str(image.path),
                         structure=structure)
    try:
        exists = path.exists()
    except OSError as exc:          # e.g. a hostile name too long for the file system
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise ChainError(f"{structure} {shown!r} cannot be looked up: {exc.strerror}",
                         path=str(image.path), structure=structure) from None
    if not exists:
        raise ChainError(f"{structure} {name!r} not found ({path})", path=str(image.path),
                         structure=structure)
    return open_image(path, fmt, strict=image.strict, allow_paths=image.allow_paths,
                      limits=image.limits, depth=image.chain_depth + 1, seen=image._seen)
