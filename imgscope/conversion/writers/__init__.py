"""Format writers by format name (imported only when used)."""
from __future__ import annotations

import importlib

from ...errors import ConvertError

WRITERS = {
    "raw": "raw:RawWriter",
    "qcow2": "qcow2:Qcow2Writer",
    "qcow": "qcow:QcowWriter",
    "vmdk": "vmdk:VmdkWriter",
    "vdi": "vdi:VdiWriter",
    "vpc": "vpc:VpcWriter",
    "vhdx": "vhdx:VhdxWriter",
}
ALIASES = {"vhd": "vpc", "qcow1": "qcow", "file": "raw"}


def writer_class(fmt: str):
    """The ImageWriter subclass for `fmt` (qemu-img's format names)."""
    name = ALIASES.get(fmt, fmt)
    target = WRITERS.get(name)
    if target is None:
        raise ConvertError(f"cannot write format {fmt!r} (can write: {', '.join(WRITERS)})")
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.{module}":
            raise ConvertError(f"writing {name} is not supported yet") from None
        raise
    return getattr(mod, cls)
