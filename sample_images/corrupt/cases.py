"""What a corrupted sample is: a clean image made by qemu-img, then documented pokes.

Each `*_cases.py` module beside this one exposes `CASES: list[Case]`;
`make_corrupt.py` builds them all and writes MANIFEST.json.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

QEMU_IMG, QEMU_IO = "qemu-img", "qemu-io"


@dataclass
class Poke:
    """Bytes written at an offset of the sample; `offset` may be computed from the clean file."""

    offset: int | Callable[[Path], int]
    data: bytes | Callable[[Path], bytes]
    why: str

    def resolve(self, path: Path) -> tuple[int, bytes]:
        off = self.offset(path) if callable(self.offset) else self.offset
        data = self.data(path) if callable(self.data) else self.data
        return int(off), bytes(data)


@dataclass
class Case:
    name: str                             # file name of the sample (extension included)
    format: str                           # imgscope / qemu-img format name
    what: str                             # the damage, in one sentence
    build: Callable[[Path], None]         # makes the clean image at the given path
    pokes: list[Poke] = field(default_factory=list)
    truncate: int | Callable[[Path], int] | None = None   # new file length after the pokes
    expected: frozenset = frozenset()     # exactly the finding codes imgscope must give
    qemu: str | None = None               # qemu-img check: clean|leaks|corruptions|incomplete (exit 1); None: n/a
    qemu_counts: dict | None = None       # qcow2: {"corruptions": n, "leaks": m} as qemu-img counts


def run(*args, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def qemu_image(fmt: str, size: str, writes: list[str], *opts: str) -> Callable[[Path], None]:
    """A builder: `qemu-img create -f fmt [opts] PATH size`, then `qemu-io -c` writes."""
    def build(path: Path) -> None:
        run(QEMU_IMG, "create", "-q", "-f", fmt, *opts, path, size)
        if writes:
            run(QEMU_IO, "-f", fmt, *[a for w in writes for a in ("-c", w)], path)
    return build


def apply(case: Case, path: Path) -> list[dict]:
    """Poke the clean image at `path` in place; returns the pokes as written (for the manifest)."""
    done = []
    for p in case.pokes:
        off, data = p.resolve(path)
        with open(path, "r+b") as f:
            old = (f.seek(off), f.read(len(data)))[1]
            f.seek(off)
            f.write(data)
        done.append({"offset": off, "old": old.hex(), "new": data.hex(), "why": p.why})
    if case.truncate is not None:
        length = case.truncate(path) if callable(case.truncate) else case.truncate
        with open(path, "r+b") as f:
            f.truncate(length)
        done.append({"truncate": int(length)})
    return done
