#!/usr/bin/env python3
"""Build the corrupted sample set: clean images by qemu-img, then documented pokes.

    python3 sample_images/corrupt/make_corrupt.py [DIR]   # default: this folder

Writes every sample of every `*_cases.py` module here and MANIFEST.json (per sample:
format, the damage, the bytes poked with their old and new values, the finding
codes imgscope must give, and qemu-img check's verdict where qemu-img checks).
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cases import Case, apply  # noqa: E402


def all_cases() -> list[Case]:
    out: list[Case] = []
    for mod in sorted(p.stem for p in HERE.glob("*_cases.py")):
        out += importlib.import_module(mod).CASES
    names = [c.name for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate sample names: {sorted(dup)}")
    return out


def build_all(directory: Path) -> dict[str, dict]:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for case in all_cases():
        path = directory / case.name
        path.unlink(missing_ok=True)
        case.build(path)
        pokes = apply(case, path)
        manifest[case.name] = {"format": case.format, "what": case.what, "pokes": pokes,
                               "expected": sorted(case.expected), "qemu": case.qemu,
                               "qemu_counts": case.qemu_counts}
    (directory / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for name, entry in build_all(target).items():
        print(f"{name:40} {entry['format']:6} {', '.join(entry['expected']) or '(clean)'}")
