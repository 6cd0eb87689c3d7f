"""Confinement of file names found inside images.

Backing files, extents, data files and locators are data written by whoever
made the image. They are opened only inside the image's own folder (or folders
the caller allows), never as absolute paths or protocol strings.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import UnsafePath


def resolve_named_file(name: str, image_path: str | os.PathLike,
                       allow_paths: Iterable[str | os.PathLike] | None = None,
                       structure: str = "file name") -> Path:
    """Resolve `name` (as written in the image) relative to the image's folder.

    Raises UnsafePath when the result lies outside the image's folder and
    outside every folder in `allow_paths`, or when the name is a protocol /
    json: string.
    """
    image_path = Path(image_path)
    if not name or "\x00" in name:
        raise UnsafePath(f"empty or NUL-containing {structure}", path=str(image_path),
                         structure=structure)
    if name.startswith("json:") or "://" in name or (":" in name.split("/")[0]
                                                       and not Path(name).is_absolute()):
        raise UnsafePath(f"{structure} {name!r} is a protocol string, not a file",
                         path=str(image_path), structure=structure)
    base = image_path.resolve().parent
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = base / candidate
    resolved = candidate.resolve()
    allowed = [base] + [Path(p).resolve() for p in (allow_paths or ())]
    for root in allowed:
        if resolved == root or root in resolved.parents:
            return resolved
    raise UnsafePath(f"{structure} {name!r} resolves to {resolved}, outside {base} "
                     "(pass allow_paths to permit it)", path=str(image_path),
                     structure=structure)
