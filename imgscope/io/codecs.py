"""Decompression of compressed clusters/grains (zlib/deflate, zstd)."""
from __future__ import annotations

import zlib

from ..errors import ParseError, Unsupported


def decompress(data: bytes, codec: str, out_size: int, *, path: str = "",
               offset: int | None = None, min_size: int | None = None) -> bytes:
    """Up to `out_size` bytes from a compressed stream, trailing slop ignored.

    Fewer than `min_size` (default: out_size) bytes is an error; a stream's last
    grain may legitimately be shorter than a full grain.

    qcow2 deflate streams are raw (no zlib header); VMDK grains use zlib
    streams ("zlib-wrapped"); zstd is one frame.  A short stream is an error.
    """
    try:
        if codec == "deflate" or codec == "zlib-raw":
            out = zlib.decompressobj(-15).decompress(data, out_size)
        elif codec == "zlib":
            out = zlib.decompressobj().decompress(data, out_size)
        elif codec == "zstd":
            try:
                import zstandard
            except ImportError:  # pragma: no cover - dependency
                raise Unsupported("zstd support needs the 'zstandard' package",
                                  path=path, offset=offset) from None
            dobj = zstandard.ZstdDecompressor().decompressobj()
            out = dobj.decompress(data)[:out_size]
        else:
            raise Unsupported(f"unknown compression codec {codec!r}", path=path, offset=offset)
    except (zlib.error, ValueError) as exc:
        raise ParseError(f"compressed data does not decode: {exc}", path=path,
                         offset=offset, structure="compressed cluster") from None
    except Exception as exc:  # zstandard.ZstdError
        if type(exc).__name__ == "ZstdError":
            raise ParseError(f"compressed data does not decode: {exc}", path=path,
                             offset=offset, structure="compressed cluster") from None
        raise
    need = out_size if min_size is None else min_size
    if len(out) < need:
        raise ParseError(f"compressed data decodes to {len(out)} bytes, expected {need}",
                         path=path, offset=offset, structure="compressed cluster")
    return out
