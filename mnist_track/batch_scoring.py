"""Scoring many images at once, for `mnist-track predict`: PNG/JPEG files and IDX image
files (MNIST's own format, gzip or plain) in, one CSV row per image out (its source, its
index there, the digit and the ten probabilities).

An IDX file named by a user has no known checksum, so it is read as untrusted: its header
must declare unsigned bytes of N x 28 x 28 with N at most MAX_IDX_IMAGES, and its images
are streamed in batches, so memory stays one batch whatever the file claims. Any input
that cannot be read is reported (`on_error`) and the others are still scored.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np
from PIL import Image

from mnist_track.defaults import IMAGE_SUFFIXES
from mnist_track.serving import (
    N_PIXELS,
    DigitClassifier,
    InvalidPixels,
    image_file_to_pixels,
    open_regular_file,
    read_image_file,
)

BATCH_SIZE = 1000  # images per forward pass: ~3 MB of float pixels, an MLP's ~10 ms
MAX_IDX_IMAGES = 1_000_000  # MNIST has 70,000: a header claiming more is corrupt or hostile
GZIP_MAGIC = b"\x1f\x8b"
IDX_UNSIGNED_BYTES = b"\x00\x00\x08"  # the IDX magic before its count of dimensions
IDX_HEADER_BYTES = 16  # magic, then N, rows, columns as big-endian uint32
CSV_COLUMNS = ("source", "index", "digit", *(f"p{digit}" for digit in range(10)))

OnError = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """One input: a PNG/JPEG file (one image) or an IDX file of `count` images."""

    path: Path
    count: int = 1
    is_idx: bool = False


def sources_of(paths: list[Path], on_error: OnError) -> list[Source]:
    """Each path as a source. A .png/.jpg/.jpeg file is an image; any other file is an
    IDX file if its first bytes say so (its header is read now, for the count), else an
    image (told apart when it is decoded). An unreadable one is reported and left out."""
    sources = []
    for path in paths:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(Source(path))
            continue
        try:
            count = idx_image_count(path)
        except InvalidPixels as error:
            on_error(str(error))
            continue
        sources.append(Source(path) if count is None else Source(path, count, is_idx=True))
    return sources


def idx_image_count(path: Path) -> int | None:
    """The number of images an IDX file's header declares; None for a file that starts
    neither like an IDX file (two zero bytes) nor like gzip. InvalidPixels for a bad
    header or a gzip file that is not IDX."""
    with open_regular_file(path) as file:
        if file.read(2) not in (GZIP_MAGIC, IDX_UNSIGNED_BYTES[:2]):
            return None
        with _idx_stream(file, path) as stream:
            return _read_header(stream, path)


def _starts_with(file: BinaryIO, magic: bytes) -> bool:
    file.seek(0)
    return file.read(len(magic)) == magic


@contextlib.contextmanager
def _idx_stream(file: BinaryIO, path: Path) -> Iterator[BinaryIO]:
    """The file's content, decompressed if it is gzip; read and gzip errors become
    InvalidPixels naming the file."""
    compressed = _starts_with(file, GZIP_MAGIC)
    file.seek(0)
    try:
        with gzip.GzipFile(fileobj=file) if compressed else contextlib.nullcontext(file) as s:
            yield s
    except (OSError, EOFError, zlib.error) as error:
        raise InvalidPixels(
            f"{path}: cannot be read or decompressed ({error}); it is truncated or corrupt"
        ) from None


def _read_header(stream: BinaryIO, path: Path) -> int:
    header = stream.read(IDX_HEADER_BYTES)
    if not header.startswith(IDX_UNSIGNED_BYTES) or len(header) < 4:
        raise InvalidPixels(f"{path}: not an IDX file of unsigned bytes (nor a PNG/JPEG file)")
    if header[3] != 3:
        raise InvalidPixels(
            f"{path}: an IDX file of {header[3]} dimensions; images are 3 (N x 28 x 28), "
            "labels files are 1"
        )
    if len(header) < IDX_HEADER_BYTES:
        raise InvalidPixels(f"{path}: ends inside its IDX header")
    count, rows, columns = struct.unpack(">3I", header[4:])
    if (rows, columns) != (28, 28):
        raise InvalidPixels(f"{path}: images of {rows}x{columns} pixels; the model reads 28x28")
    if count > MAX_IDX_IMAGES:
        raise InvalidPixels(f"{path}: declares {count:,} images; at most {MAX_IDX_IMAGES:,}")
    return count


def idx_batches(path: Path, batch_size: int = BATCH_SIZE) -> Iterator[np.ndarray]:
    """An IDX images file as uint8 pixels (n, 784), at most `batch_size` images at a time.
    A file that ends early, or holds more than its header declares, raises InvalidPixels
    when that is found (a plain file's size is checked before the first batch)."""
    with open_regular_file(path) as file, _idx_stream(file, path) as stream:
        count = _read_header(stream, path)
        size, declared = os.fstat(file.fileno()).st_size, IDX_HEADER_BYTES + count * N_PIXELS
        if stream is file and size != declared:  # plain: its size is known before reading
            raise InvalidPixels(
                f"{path}: {size:,} bytes, but its header declares {count:,} images "
                f"({declared:,} bytes)"
            )
        for start in range(0, count, batch_size):
            wanted = min(batch_size, count - start) * N_PIXELS
            content = stream.read(wanted)
            if len(content) < wanted:
                raise InvalidPixels(
                    f"{path}: ends after {start + len(content) // N_PIXELS:,} of the "
                    f"{count:,} images its header declares"
                )
            yield np.frombuffer(content, dtype=np.uint8).reshape(-1, N_PIXELS)
        if stream.read(1):
            raise InvalidPixels(f"{path}: holds more than the {count:,} images its header declares")


def score(
    classifier: DigitClassifier,
    sources: list[Source],
    output: PredictionsCsv,
    *,
    on_error: OnError,
    on_progress: Callable[[int], None] = lambda done: None,
    batch_size: int = BATCH_SIZE,
) -> None:
    """Every image of `sources`, scored in batches of about `batch_size` and written as a
    row of `output`; `on_progress(n)` after each batch of n images."""
    with warnings.catch_warnings():
        # Pillow warns of sizes far beyond the cap, which is refused in one line anyway.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for labels, pixels in _batches(sources, on_error, batch_size):
            output.write(labels, classifier.probabilities(pixels))
            on_progress(len(labels))


def _batches(sources, on_error, batch_size) -> Iterator[tuple[list[tuple[str, int]], np.ndarray]]:
    """(source and index of each image, float32 pixels) of batch_size images or a few more,
    the last batch smaller."""
    labels: list[tuple[str, int]] = []
    pixels: list[np.ndarray] = []
    for source_labels, source_pixels in _images(sources, on_error, batch_size):
        labels += source_labels
        pixels.append(source_pixels)
        if len(labels) >= batch_size:
            yield labels, np.concatenate(pixels)
            labels, pixels = [], []
    if labels:
        yield labels, np.concatenate(pixels)


def _images(sources, on_error, batch_size) -> Iterator[tuple[list[tuple[str, int]], np.ndarray]]:
    for source in sources:
        name = str(source.path)
        try:
            if not source.is_idx:
                image = image_file_to_pixels(read_image_file(source.path), name)
                yield [(name, 0)], image[np.newaxis]
                continue
            done = 0
            for batch in idx_batches(source.path, batch_size):
                yield [(name, done + i) for i in range(len(batch))], batch.astype(np.float32)
                done += len(batch)
        except InvalidPixels as error:
            on_error(str(error))


class PredictionsCsv:
    """Predictions as CSV rows (CSV_COLUMNS) on a text stream. The header goes out with
    the first row, so a run that scores nothing writes nothing."""

    def __init__(self, stream: TextIO) -> None:
        self.writer = csv.writer(stream, lineterminator="\n")
        self.rows = 0

    def write(self, labels: list[tuple[str, int]], probabilities: np.ndarray) -> None:
        if not self.rows:
            self.writer.writerow(CSV_COLUMNS)
        digits = probabilities.argmax(axis=1)
        self.writer.writerows(
            [source, index, int(digit), *(f"{p:.6g}" for p in row)]
            for (source, index), digit, row in zip(labels, digits, probabilities, strict=True)
        )
        self.rows += len(labels)


@contextlib.contextmanager
def predictions_csv(path: str | os.PathLike | None) -> Iterator[PredictionsCsv]:
    """Predictions to `path`, else to stdout. A file appears whole or not at all: it is
    written beside its place and moved there at the end, if any row was written."""
    if path is None:
        yield PredictionsCsv(sys.stdout)
        return
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("w", newline="") as stream:
            output = PredictionsCsv(stream)
            yield output
        if output.rows:
            partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
