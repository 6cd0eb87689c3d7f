"""Bounds on what a (possibly hostile) image may make imgscope allocate or do."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Caps checked before every allocation or loop driven by a value in a file.

    The defaults are far above what real images need (qemu's own caps are lower)
    yet keep memory bounded when a header lies.
    """

    max_table_bytes: int = 512 << 20      # one metadata table read in one go
    max_metadata_bytes: int = 4 << 30     # all L2/grain tables of one image
    max_extents: int = 1 << 25            # merged runs in a guest map
    max_chain_depth: int = 64             # backing files
    max_snapshots: int = 4096            # QEMU allows 65536; real images have a few
    max_header_bytes: int = 2 << 20       # cluster 0 / header area


DEFAULT_LIMITS = Limits()
