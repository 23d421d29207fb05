"""Image files that tests of several modules write."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def huge_png(path: Path, width: int, height: int) -> Path:
    """A real PNG header that declares width x height, with one tiny compressed row: what a
    decompression bomb looks like (PIL alone raises DecompressionBombError on opening it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 65))
                     + chunk(b"IEND", b""))
    return path
