"""Check rules of raw images: nothing beyond the generic rules.

A raw file is the guest disk byte for byte: it has no header, no table and no
pointer that could be damaged, so there is nothing format-specific to check
(qemu-img check exits 63 for raw).  The generic rules still run; a raw file
has one data region covering the file, so they find nothing either.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..check import CheckContext


def check(ctx: CheckContext) -> None:
    """Nothing to check: every byte of a raw file is guest data."""
