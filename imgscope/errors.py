"""One exception family for everything imgscope raises.

Every error carries the file it concerns and, where it makes sense, the byte
offset and the structure being read, so a forensic user can find the place.
Only these types leave the package; construct and OS errors are wrapped.
"""
from __future__ import annotations


class ImageError(Exception):
    """Base of every imgscope error: message plus path, offset and structure."""

    def __init__(self, message: str, *, path: str | None = None,
                 offset: int | None = None, structure: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.offset = offset
        self.structure = structure

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.structure:
            where.append(self.structure)
        if self.offset is not None:
            where.append(f"offset {self.offset:#x}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class UnknownFormat(ImageError):
    """No driver recognises the file."""


class ParseError(ImageError, ValueError):
    """Bytes that do not follow the format's rules."""


class Truncated(ImageError, EOFError):
    """A structure extends past the end of the file."""


class Unsupported(ImageError, NotImplementedError):
    """A recognised format, feature or variant imgscope cannot handle (yet)."""


class UnsafePath(ImageError):
    """A path named inside an image points outside the allowed folders."""


class LimitExceeded(ImageError):
    """A size or count read from the file exceeds the configured limits."""


class ChainError(ImageError):
    """A backing chain that loops, is too deep, or names a missing file."""


class RepairError(ImageError):
    """A repair could not be planned or applied."""


class ConvertError(ImageError):
    """A conversion could not be completed."""
