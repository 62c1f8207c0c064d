"""MNIST on disk and in memory: finding, verifying and reading the IDX files, seeded
train/validation splits, and whole splits held as normalized tensors on one device.

Batches are taken by indexing these tensors (see `train.py`), never through a per-sample
Dataset/DataLoader, which is what makes an epoch fast.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_track.defaults import DATA_DIR_ENV, TEST_SIZE, TRAIN_SIZE
from mnist_track.errors import MnistTrackError
from mnist_track.pixels import normalize_pixels

DEFAULT_DATA_DIR = "data"

# sha256 of the *decompressed* bytes: one of the shared gzip files was recompressed, so
# only the content is comparable across copies.
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Decompressed size of each file (header + records): a file that inflates to more is
# refused as soon as it passes this, so a gzip bomb never fills memory.
MNIST_SIZES = {
    "train-images-idx3-ubyte": 16 + TRAIN_SIZE * 28 * 28,
    "train-labels-idx1-ubyte": 8 + TRAIN_SIZE,
    "t10k-images-idx3-ubyte": 16 + TEST_SIZE * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + TEST_SIZE,
}
READ_CHUNK = 1 << 20


class DataError(MnistTrackError, RuntimeError):
    """The MNIST files are missing, unreadable or not what they claim to be."""


@dataclass(frozen=True)
class RawMnist:
    """The four IDX files as uint8 arrays: images (N, 28, 28), labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    folder: str = ""  # where the files were read from (the source of the runs' datasets)


@dataclass(frozen=True)
class Split:
    """One split as tensors on the training device: normalized float32 images
    (N, 1, 28, 28) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SplitLineage:
    """One split as MLflow records it among a run's dataset inputs: which images (the
    digest), read from where, and what the run used them for."""

    name: str
    context: str  # MLflow's dataset context: "training", "validation" or "test"
    digest: str
    folder: str
    rows: int


@dataclass(frozen=True)
class MnistSplits:
    train: Split
    validation: Split
    test: Split  # only for the final report, never for choosing anything
    # Which validation images these are (see `validation_digest`); empty when unknown.
    validation_digest: str = ""
    lineage: tuple[SplitLineage, ...] = ()  # empty when not made from the IDX files

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The option if given, else $MNIST_TRACK_DATA, else ./data."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def find_files(data_dir: Path) -> dict[str, Path | None]:
    """Each expected file, gzip-compressed or plain, or None where it is missing."""
    found: dict[str, Path | None] = {}
    for stem in MNIST_FILES:
        candidates = [data_dir / f"{stem}.gz", data_dir / stem]
        found[stem] = next((path for path in candidates if path.is_file()), None)
    return found


def ensure_files(data_dir: Path, download: bool = True) -> dict[str, Path]:
    """Paths of the four files, downloading the missing ones when allowed and online."""
    found = find_files(data_dir)
    missing = [stem for stem, path in found.items() if path is None]
    if missing and download:
        _download(data_dir, missing)
        found = find_files(data_dir)
        missing = [stem for stem, path in found.items() if path is None]
    if missing:
        expected = ", ".join(f"{stem}[.gz]" for stem in MNIST_FILES)
        raise DataError(
            f"MNIST files missing in {data_dir.resolve()}: {', '.join(missing)}. "
            f"Expected the four IDX files {expected}. Point --data-dir or ${DATA_DIR_ENV} "
            "at a folder that has them, or run `mnist-track data` on a machine that is online."
        )
    return {stem: path for stem, path in found.items() if path is not None}


def _download(data_dir: Path, stems: list[str]) -> None:
    """Fetch files with torchvision's MNIST mirrors; any network failure becomes DataError
    with the offline instructions (raised by the caller)."""
    try:
        from torchvision.datasets import MNIST
        from torchvision.datasets.utils import download_url
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    md5_by_name = dict(MNIST.resources)
    for stem in stems:
        filename = f"{stem}.gz"
        for mirror in MNIST.mirrors:
            try:
                download_url(
                    mirror + filename,
                    root=str(data_dir),
                    filename=filename,
                    md5=md5_by_name.get(filename),
                )
                break
            except Exception:  # noqa: BLE001 - offline or mirror down: try the next one
                continue


def read_idx(path: Path, expected_sha256: str, max_size: int | None = None) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array, after checking its content hash.
    The content is read (and decompressed) in chunks, and refused as soon as it passes
    `max_size` bytes (by default the size of the MNIST file with that hash)."""
    if max_size is None:
        max_size = next(
            (MNIST_SIZES[stem] for stem, sha in MNIST_FILES.items() if sha == expected_sha256),
            None,
        )
    try:
        content = _read_bounded(path, max_size)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(
            f"{path}: cannot be read or decompressed ({error}); it is "
            "truncated or corrupt: delete it and fetch it again"
        ) from error
    digest = hashlib.sha256(content).hexdigest()
    if digest != expected_sha256:
        raise DataError(
            f"{path}: checksum mismatch (sha256 of the decompressed bytes is "
            f"{digest}, expected {expected_sha256}); the file is truncated, "
            "corrupt or not this MNIST file: delete it and fetch it again"
        )
    return _parse_idx(content, path)


def _read_bounded(path: Path, max_size: int | None) -> bytearray:
    """The file's content, decompressed if it is gzip, read in chunks into one buffer;
    DataError as soon as it passes `max_size` bytes (None: no bound)."""
    with path.open("rb") as file:
        compressed = file.read(2) == b"\x1f\x8b"
    if max_size is None:
        return bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    if not compressed and path.stat().st_size > max_size:
        raise _too_large(path, max_size)
    # One byte of room past the bound, so reading it shows the file is too large.
    content = bytearray(max_size + 1)
    size = 0
    with (gzip.open if compressed else open)(path, "rb") as stream, memoryview(content) as view:
        while size <= max_size:
            read = stream.readinto(view[size : size + READ_CHUNK])
            if not read:
                break
            size += read
    if size > max_size:
        raise _too_large(path, max_size)
    del content[size:]
    return content


def _too_large(path: Path, max_size: int) -> DataError:
    return DataError(
        f"{path}: holds more than the {max_size:,} bytes of the MNIST file it is named "
        "for (read stopped there); it is corrupt or not this MNIST file: delete it and "
        "fetch it again"
    )


def _parse_idx(content: bytearray, path: Path) -> np.ndarray:
    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    n_dims = content[3]
    header_end = 4 + 4 * n_dims
    dims = tuple(int(d) for d in np.frombuffer(content[4:header_end], dtype=">u4"))
    # Writable (a bytearray), so torch.from_numpy can share it without a warning.
    data = np.frombuffer(content, dtype=np.uint8, offset=header_end)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header promises shape {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> RawMnist:
    """All four files, verified, as uint8 arrays."""
    folder = resolve_data_dir(data_dir)
    paths = ensure_files(folder, download=download)
    arrays = {stem: read_idx(path, MNIST_FILES[stem]) for stem, path in paths.items()}
    return RawMnist(
        train_images=arrays["train-images-idx3-ubyte"],
        train_labels=arrays["train-labels-idx1-ubyte"],
        test_images=arrays["t10k-images-idx3-ubyte"],
        test_labels=arrays["t10k-labels-idx1-ubyte"],
        folder=str(folder.resolve()),
    )


TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def split_digest(files: tuple[str, ...], *settings: str) -> str:
    """Names a split's images: the verified SHA-256 of the files it is drawn from plus the
    settings that draw it. Equal digests mean the same images, whichever machine or copy
    of the files they came from."""
    identity = ":".join([MNIST_FILES[stem] for stem in files] + list(settings))
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def validation_digest(val_size: int, split_seed: int) -> str:
    """Two runs with the same validation digest were validated on the same images, so
    their validation accuracies are comparable (the registry's champion rule relies on it;
    the formula is kept as it is, so versions registered earlier stay comparable)."""
    return split_digest(TRAIN_FILES, f"val_size={val_size}", f"split_seed={split_seed}")


def split_lineage(
    folder: str,
    sizes: dict[str, int],
    *,
    val_size: int,
    split_seed: int,
    train_limit: int | None,
    test_limit: int | None,
) -> tuple[SplitLineage, ...]:
    split = (f"val_size={val_size}", f"split_seed={split_seed}")
    return (
        SplitLineage(
            "mnist-train",
            "training",
            split_digest(TRAIN_FILES, *split, f"train_limit={train_limit}", "train"),
            folder,
            sizes["train"],
        ),
        SplitLineage(
            "mnist-validation",
            "validation",
            validation_digest(val_size, split_seed),
            folder,
            sizes["validation"],
        ),
        SplitLineage(
            "mnist-test",
            "test",
            split_digest(TEST_FILES, f"test_limit={test_limit}"),
            folder,
            sizes["test"],
        ),
    )


def make_splits(
    raw: RawMnist,
    *,
    val_size: int,
    split_seed: int,
    device: torch.device,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> MnistSplits:
    """Seeded train/validation split of the 60k training set; the test set as it is.
    The split depends only on `split_seed`, so every trial of a study sees the same one."""
    order = torch.randperm(
        len(raw.train_labels), generator=torch.Generator().manual_seed(split_seed)
    )
    validation_index, train_index = order[:val_size], order[val_size:]
    if train_limit is not None:
        train_index = train_index[:train_limit]
    test_count = (
        len(raw.test_labels) if test_limit is None else min(test_limit, len(raw.test_labels))
    )
    train_images = torch.from_numpy(raw.train_images)
    train_labels = torch.from_numpy(raw.train_labels)
    sizes = {"train": len(train_index), "validation": len(validation_index), "test": test_count}
    return MnistSplits(
        train=_to_split(train_images[train_index], train_labels[train_index], device),
        validation=_to_split(
            train_images[validation_index], train_labels[validation_index], device
        ),
        test=_to_split(
            torch.from_numpy(raw.test_images[:test_count]),
            torch.from_numpy(raw.test_labels[:test_count]),
            device,
        ),
        validation_digest=validation_digest(val_size, split_seed),
        lineage=split_lineage(
            raw.folder,
            sizes,
            val_size=val_size,
            split_seed=split_seed,
            train_limit=train_limit,
            test_limit=test_limit,
        ),
    )


def splits_for(raw: RawMnist, config, device: torch.device) -> MnistSplits:
    """`make_splits` with the split settings of a TrainConfig."""
    return make_splits(
        raw,
        val_size=config.val_size,
        split_seed=config.split_seed,
        device=device,
        train_limit=config.train_limit,
        test_limit=config.test_limit,
    )


def _to_split(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Split:
    # Move uint8 first (4x fewer bytes to copy), normalize on the device.
    return Split(
        images=normalize_pixels(images.to(device)),
        labels=labels.to(device=device, dtype=torch.long),
    )
