"""Progress bars for long work: one tqdm bar counting bytes, the notebook widget
inside Jupyter (tqdm.auto), text on stderr elsewhere.

Long-running API calls take `progress=` as None (quiet), True (this bar) or a
callable of their own; `byte_bar` turns True into a callable and a close().
"""
from __future__ import annotations

import sys
from typing import Callable


def byte_bar(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(progress(done, total), close()) driving one tqdm.auto bar in bytes."""
    from tqdm.auto import tqdm
    bar = tqdm(total=1, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = max(total, 1)
        bar.n = done
        bar.refresh()
    return progress, bar.close


def resolve(progress, desc: str) -> tuple[Callable | None, Callable[[], None]]:
    """None/False -> quiet, True -> a byte bar, a callable -> itself; plus its close()."""
    if progress is True:
        return byte_bar(desc)
    return (progress or None), (lambda: None)
