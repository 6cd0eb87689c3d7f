"""One guest reader for every format, driven by the resolved extent table.

Reads are translated run by run: data runs are positional reads of the host
file, zero/unallocated runs are filled with zeros, compressed runs are
decompressed one cluster at a time (with a small cache so sequential reads
inside a cluster decompress it once).
"""
from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np

from ..errors import ImageError, Unsupported
from ..model import (ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED,
                     KIND_COMPRESSED, KIND_ENCRYPTED, FLAG_RECORD)
from .codecs import decompress


class PositionalReader(io.RawIOBase):
    """Read-only, seekable binary file whose subclasses only answer `pread_into`."""

    size = 0

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:
        out = np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8)
        n = min(out.size, max(0, self.size - self._pos))
        if n <= 0:
            return 0
        self.pread_into(self._pos, out[:n])
        self._pos += n
        return n

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (short only at the end)."""
        length = max(0, min(length, self.size - offset))
        buf = bytearray(length)
        if length:
            self.pread_into(offset, np.frombuffer(buf, dtype=np.uint8))
        return bytes(buf)

    def pread_into(self, offset: int, out: np.ndarray) -> None:
        raise NotImplementedError


class GuestReader(PositionalReader):
    """Readable, seekable binary file over a guest disk (never writes)."""

    def __init__(self, table: ExtentTable, size: int, cluster_size: int | None = None,
                 cache_clusters: int = 64) -> None:
        super().__init__()
        self.table = table
        self.size = int(size)
        self.cluster_size = cluster_size or table.cluster_size
        self._cache: OrderedDict = OrderedDict()
        self._cache_max = cache_clusters
        self._starts = table.guest
        self._ends = table.guest + table.length

    def pread_into(self, offset: int, out: np.ndarray) -> None:
        t = self.table
        pos, end = offset, offset + out.size
        i = int(np.searchsorted(self._starts, np.uint64(pos), side="right")) - 1
        while pos < end:
            if i < 0 or i >= len(t) or pos >= int(self._ends[i]):
                # outside every run (should not happen for a complete map): zeros
                nxt = int(self._starts[i + 1]) if i + 1 < len(t) else end
                stop = min(end, max(nxt, pos + 1))
                out[pos - offset:stop - offset] = 0
                pos = stop
                i += 1
                continue
            run_start, run_end = int(self._starts[i]), int(self._ends[i])
            stop = min(end, run_end)
            dst = out[pos - offset:stop - offset]
            kind = int(t.kind[i])
            if kind in (KIND_DATA, KIND_COMPRESSED) and int(t.file[i]) < 0:
                raise ImageError("guest data lives in a file that could not be opened",
                                 offset=pos, structure="guest data")
            if kind == KIND_DATA:
                src = t.files[int(t.file[i])]
                host = int(t.host[i]) + (pos - run_start)
                got = src.pread_into(host, dst) if host < src.size else 0
                dst[got:] = 0
            elif kind in (KIND_ZERO, KIND_UNALLOCATED):
                dst[:] = 0
            elif kind == KIND_COMPRESSED:
                cluster = self._cluster(i)
                inner = int(t.inner[i]) + (pos - run_start)
                dst[:] = np.frombuffer(cluster, dtype=np.uint8)[inner:inner + dst.size]
            elif kind == KIND_ENCRYPTED:
                raise Unsupported("reading encrypted clusters is not supported yet",
                                  path=str(t.files[int(t.file[i])].path),
                                  offset=int(t.host[i]), structure="encrypted data")
            pos = stop
            i += 1

    def _cluster(self, i: int) -> bytes:
        t = self.table
        key = (int(t.file[i]), int(t.host[i]))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        f = int(t.file[i])
        src = t.files[f]
        codec = t.file_codecs[f] if t.file_codecs else t.codec
        out_size = (t.file_cluster_sizes[f] if t.file_cluster_sizes else 0) or self.cluster_size
        host, length = int(t.host[i]), int(t.host_length[i])
        if t.flags[i] & FLAG_RECORD:          # length stored in the record header
            length = int.from_bytes(src.read(host + 8, 4, "grain record header"), "little")
            host += 12
        stored = src.read_upto(host, length)
        data = decompress(stored, codec, out_size, path=str(src.path),
                          offset=host, min_size=int(t.inner[i] + t.length[i]))
        self._cache[key] = data
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return data
