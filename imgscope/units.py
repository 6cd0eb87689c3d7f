"""Byte sizes as people and qemu-img write them."""
from __future__ import annotations


def human_size(n: int) -> str:
    """qemu-img style size: '1 GiB', '192 KiB', '1.5 MiB'."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{n} B"
    return f"{value:.3g} {units[i]}"


def parse_size(text: str) -> int:
    """'64k', '1G', '1.5M', '4096' -> bytes (binary units, as qemu-img)."""
    t = text.strip().lower()
    for suffix in ("ib", "b"):
        if t.endswith(suffix) and len(t) > len(suffix) and t[-len(suffix) - 1] in "kmgtpe":
            t = t[:-len(suffix)]
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
    factor = mult.get(t[-1:], 1)
    if t[-1:] in mult:
        t = t[:-1]
    value = float(t) if "." in t else int(t)
    if value < 0:
        raise ValueError(f"negative size {text!r}")
    return int(value * factor)
