"""Hostile PNG files that the size checks must refuse, for the tests and ``bench/hostile.py``.

Both build their decompression bombs and overflowing headers here, so they probe the same bytes.
"""

from __future__ import annotations

import functools
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _ihdr(width: int, height: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))  # 8-bit gray


@functools.cache
def png_bomb(side: int = 20000) -> bytes:
    """A valid grayscale PNG of ``side`` x ``side`` black pixels: 389 KB at 20000 px that decode
    to 400 MB (1.2 GB as RGB), a decompression bomb. Built once per process (~3 s at 20000)."""
    deflate = zlib.compressobj(9)
    rows = b"\0" * (side + 1) * 100  # 100 scanlines: filter byte 0, then black pixels
    idat = b"".join(deflate.compress(rows) for _ in range(side // 100))
    idat += deflate.compress(b"\0" * (side + 1) * (side % 100)) + deflate.flush()
    return PNG_SIGNATURE + _ihdr(side, side) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_header(width: int, height: int) -> bytes:
    """A PNG of a signature, an IHDR declaring ``width`` x ``height`` and IEND: all a size check
    reads. Any 32-bit sides, also those the PNG format forbids: 0xFFFFFFFF x 0xFFFFFFFF gives a
    negative product in int64."""
    return PNG_SIGNATURE + _ihdr(width, height) + _chunk(b"IEND", b"")
