"""Hostile and edge-case image files for the serving tests: built here, byte by byte where
Pillow will not write them (a PNG that declares a size it does not hold, padding to an
exact length, a JPEG with thousands of scans)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray, **options) -> bytes:
    return encode(Image.fromarray(pixels.astype(np.uint8)), "PNG", **options)


def jpeg(pixels: np.ndarray, **options) -> bytes:
    return encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", **options)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int, bit_depth: int = 8, rows: int = 1) -> bytes:
    """A grayscale PNG whose header declares width x height but whose data holds only
    `rows` rows of zeros: what a decoder would allocate is the declared size."""
    raw = (b"\x00" + bytes(-(-width * bit_depth // 8))) * rows if rows else b""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def png_bomb(side: int = 12_000) -> bytes:
    """A complete 1-bit PNG of side x side black pixels: ~18 KB that Pillow would decode
    to side**2 bytes (144 MB for 12,000), below Pillow's own bomb error."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)


def pad_png(content: bytes, size: int) -> bytes:
    """The PNG grown to exactly `size` bytes with ancillary chunks before IEND (a decoder
    skips them, but still reads them: many small ones is the costliest padding)."""
    body, end = content[:-12], content[-12:]
    missing = size - len(content)
    if missing < 12:
        raise ValueError(f"cannot pad a {len(content)}-byte PNG to {size} bytes")
    chunks = []
    while missing >= 24 or missing == 12:
        chunks.append(png_chunk(b"scAl", b""))  # 12 bytes each, ancillary (lower case)
        missing -= 12
    if missing:
        chunks.append(png_chunk(b"scAl", bytes(missing - 12)))
    return body + b"".join(chunks) + end


def pad_jpeg(content: bytes, size: int) -> bytes:
    """The JPEG grown to exactly `size` bytes with a comment segment after SOI."""
    missing = size - len(content)
    if not 4 <= missing <= 65_537:
        raise ValueError(f"cannot pad a {len(content)}-byte JPEG to {size} bytes")
    comment = b"\xff\xfe" + struct.pack(">H", missing - 2) + bytes(missing - 4)
    return content[:2] + comment + content[2:]


def jpeg_scan_bomb(side: int = 1024, scans: int = 5000) -> bytes:
    """A progressive JPEG with `scans` extra empty scans (10 bytes each): each one makes
    libjpeg walk every block of the image again (~0.4 s of CPU from 60 KB at 1024x1024)."""
    content = jpeg(np.zeros((side, side)), progressive=True)
    start = content.rfind(b"\xff\xda")
    length = struct.unpack(">H", content[start + 2 : start + 4])[0]
    scan_header = content[start : start + 2 + length]
    end = content.rfind(b"\xff\xd9")
    return content[:end] + scan_header * scans + content[end:]


def other_formats() -> dict[str, bytes]:
    """A 28x28 image in each format Pillow writes that the served model must refuse."""
    image = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    files = {}
    for kind in ("GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA", "DDS"):
        try:
            files[kind] = encode(image.convert("RGB") if kind == "DDS" else image, kind)
        except (KeyError, OSError, ValueError):
            continue  # not writable by this Pillow build
    return files


def fuzzed_dds(seed: int = 0) -> bytes:
    """A DDS file with its header mutated: Pillow's DDS plugin raised odd errors (and
    their tracebacks reached the client) before only PNG/JPEG were decoded."""
    content = bytearray(other_formats().get("DDS") or b"DDS " + bytes(124))
    rng = np.random.default_rng(seed)
    for index in rng.integers(4, 128, 12):
        content[index] = int(rng.integers(0, 256))
    return bytes(content)


def exactly_784_bytes(pixels: np.ndarray, kind: str) -> bytes:
    """The 28x28 digit as a valid PNG or JPEG file of exactly 784 bytes, the length of
    raw pixels."""
    content = png(pixels, optimize=True) if kind == "PNG" else jpeg(pixels, quality=20)
    if len(content) > 784 - 24:
        raise ValueError(f"{kind} of {len(content)} bytes is too large to pad to 784")
    return pad_png(content, 784) if kind == "PNG" else pad_jpeg(content, 784)
