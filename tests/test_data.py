"""Unit tests for mnist_track.data: reading and verifying the IDX files, splits, data dir."""

from __future__ import annotations

import gzip
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_track import data
from mnist_track.data import (
    MNIST_FILES,
    DataError,
    load_mnist,
    make_splits,
    read_idx,
    resolve_data_dir,
)
from mnist_track.pixels import PIXEL_MEAN, PIXEL_STD

CPU = torch.device("cpu")
LABELS = "t10k-labels-idx1-ubyte"  # the smallest file, for corruption tests


def link_all(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """Symlink the shared .gz files into `target`, except the stems in `skip`."""
    target.mkdir(exist_ok=True)
    for stem in MNIST_FILES:
        if stem not in skip:
            (target / f"{stem}.gz").symlink_to(source / f"{stem}.gz")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Undo normalize_pixels: normalized (N, 1, 28, 28) -> uint8 (N, 784)."""
    pixels = images.reshape(len(images), -1) * (255 * PIXEL_STD) + 255 * PIXEL_MEAN
    return pixels.round_().clamp_(0, 255).to(torch.uint8).numpy()


def row_counts(pixels: np.ndarray, labels: np.ndarray) -> dict[bytes, int]:
    """How often each (image, label) row occurs: uint8 (N, 784) and (N,) -> {row: count}."""
    rows = np.ascontiguousarray(np.column_stack([pixels, labels.astype(np.uint8)]))
    unique, counts = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))), return_counts=True)
    return dict(zip((row.tobytes() for row in unique), counts.tolist(), strict=True))


# --- reading the files -------------------------------------------------------------------


def test_load_real_gzip_files(data_dir):
    raw = load_mnist(data_dir, download=False)
    assert raw.train_images.shape == (60000, 28, 28)
    assert raw.train_labels.shape == (60000,)
    assert raw.test_images.shape == (10000, 28, 28)
    assert raw.test_labels.shape == (10000,)
    for array in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        assert array.dtype == np.uint8
    assert set(np.unique(raw.train_labels)) == set(range(10))
    assert set(np.unique(raw.test_labels)) == set(range(10))
    assert raw.train_images.max() == 255 and raw.train_images.min() == 0
    # The arrays are writable (torch.from_numpy shares them without a warning).
    assert raw.train_images.flags.writeable


def test_load_plain_decompressed_copy(tmp_path, data_dir, raw_mnist):
    for stem in MNIST_FILES:
        (tmp_path / stem).write_bytes(gzip.decompress((data_dir / f"{stem}.gz").read_bytes()))
    plain = load_mnist(tmp_path, download=False)
    np.testing.assert_array_equal(plain.train_images, raw_mnist.train_images)
    np.testing.assert_array_equal(plain.train_labels, raw_mnist.train_labels)
    np.testing.assert_array_equal(plain.test_images, raw_mnist.test_images)
    np.testing.assert_array_equal(plain.test_labels, raw_mnist.test_labels)


def test_checksum_mismatch_names_the_file(tmp_path, data_dir):
    content = bytearray(gzip.decompress((data_dir / f"{LABELS}.gz").read_bytes()))
    content[100] = (content[100] + 1) % 10  # still a valid label, but not the real file
    link_all(data_dir, tmp_path, skip=(LABELS,))
    modified = tmp_path / f"{LABELS}.gz"
    modified.write_bytes(gzip.compress(bytes(content)))

    with pytest.raises(DataError) as caught:
        read_idx(modified, MNIST_FILES[LABELS])
    assert str(modified) in str(caught.value)
    assert "checksum mismatch" in str(caught.value)

    with pytest.raises(DataError, match="checksum mismatch") as caught:
        load_mnist(tmp_path, download=False)
    assert str(modified) in str(caught.value)


def test_truncated_gzip_is_a_data_error(tmp_path, data_dir):
    compressed = (data_dir / f"{LABELS}.gz").read_bytes()
    link_all(data_dir, tmp_path, skip=(LABELS,))
    truncated = tmp_path / f"{LABELS}.gz"
    truncated.write_bytes(compressed[: len(compressed) // 2])

    with pytest.raises(DataError) as caught:
        read_idx(truncated, MNIST_FILES[LABELS])
    assert str(truncated) in str(caught.value)
    assert "truncated or corrupt" in str(caught.value)
    with pytest.raises(DataError, match="truncated"):
        load_mnist(tmp_path, download=False)


def test_truncated_plain_file_is_a_data_error(tmp_path, data_dir):
    content = gzip.decompress((data_dir / f"{LABELS}.gz").read_bytes())
    truncated = tmp_path / LABELS
    truncated.write_bytes(content[:-10])
    with pytest.raises(DataError, match=str(truncated)):
        read_idx(truncated, MNIST_FILES[LABELS])


def gzip_bomb(path: Path, megabytes: int) -> Path:
    """A small .gz file (about 1 KB per MB) that inflates to `megabytes` MB of zeros."""
    chunk = bytes(1 << 20)
    with gzip.open(path, "wb") as stream:
        for _ in range(megabytes):
            stream.write(chunk)
    return path


def peak_memory_of(call) -> int:
    """Peak bytes allocated by Python (zlib's output included) while `call` runs."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_gzip_bomb_is_refused_before_it_fills_memory(tmp_path):
    bomb = gzip_bomb(tmp_path / f"{LABELS}.gz", 64)
    assert bomb.stat().st_size < 200_000

    def read():
        with pytest.raises(DataError) as caught:
            read_idx(bomb, MNIST_FILES[LABELS])
        message = str(caught.value)
        assert str(bomb) in message
        assert "more than the 10,008 bytes" in message

    # Reading stops one chunk past the file's known size, not at the bomb's 64 MB.
    assert peak_memory_of(read) < 4 << 20


def test_an_oversized_plain_file_is_refused_unread(tmp_path):
    oversized = tmp_path / LABELS
    with oversized.open("wb") as file:
        file.truncate(1 << 30)  # sparse: 1 GB on paper, nothing on disk

    def read():
        with pytest.raises(DataError, match="more than the 10,008 bytes"):
            read_idx(oversized, MNIST_FILES[LABELS])

    assert peak_memory_of(read) < 1 << 20


def test_a_file_of_exactly_its_size_is_read(data_dir):
    # The bound is the file's own size: the real files fit it exactly.
    labels = read_idx(data_dir / f"{LABELS}.gz", MNIST_FILES[LABELS])
    assert labels.shape == (data.MNIST_SIZES[LABELS] - 8,)
    assert labels.flags.writeable


def test_missing_files_without_download(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as caught:
        load_mnist(empty, download=False)
    message = str(caught.value)
    assert str(empty.resolve()) in message
    for stem in MNIST_FILES:
        assert stem in message


def test_missing_file_lists_only_what_is_missing(tmp_path, data_dir):
    link_all(data_dir, tmp_path, skip=(LABELS,))
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path, download=False)
    missing_part = str(caught.value).split("Expected")[0]
    assert LABELS in missing_part
    assert "train-images-idx3-ubyte" not in missing_part


def test_failed_download_still_raises(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "_download", lambda folder, stems: calls.append((folder, stems)))
    folder = tmp_path / "nothing"
    with pytest.raises(DataError) as caught:
        load_mnist(folder, download=True)
    assert calls == [(folder, list(MNIST_FILES))]  # the download was attempted, for all four
    message = str(caught.value)
    assert str(folder.resolve()) in message
    for stem in MNIST_FILES:
        assert stem in message


def test_no_download_attempt_when_files_are_present(data_dir, monkeypatch):
    def fail(*args):
        raise AssertionError("_download called although all files are present")

    monkeypatch.setattr(data, "_download", fail)
    assert len(load_mnist(data_dir, download=True).test_labels) == 10000


# --- resolve_data_dir --------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert resolve_data_dir(tmp_path / "from-arg") == tmp_path / "from-arg"
    assert resolve_data_dir(str(tmp_path / "from-arg")) == tmp_path / "from-arg"
    assert resolve_data_dir(None) == tmp_path / "from-env"
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert resolve_data_dir(None) == Path("data")
    assert resolve_data_dir() == Path("data")


def test_load_mnist_reads_the_env_directory(data_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(data_dir))
    assert len(load_mnist(download=False).train_labels) == 60000


# --- make_splits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_splits(raw_mnist):
    return make_splits(raw_mnist, val_size=5000, split_seed=0, device=CPU)


def test_split_sizes(full_splits, raw_mnist):
    assert full_splits.sizes() == {"train": 55000, "validation": 5000, "test": 10000}
    limited = make_splits(
        raw_mnist, val_size=1000, split_seed=0, device=CPU, train_limit=300, test_limit=40
    )
    assert limited.sizes() == {"train": 300, "validation": 1000, "test": 40}
    generous = make_splits(raw_mnist, val_size=1000, split_seed=0, device=CPU, test_limit=10**6)
    assert generous.sizes() == {"train": 59000, "validation": 1000, "test": 10000}


def test_each_split_has_a_lineage_digest_that_names_its_images(raw_mnist, full_splits):
    lineage = {split.context: split for split in full_splits.lineage}
    assert {context: split.name for context, split in lineage.items()} == {
        "training": "mnist-train",
        "validation": "mnist-validation",
        "test": "mnist-test",
    }
    assert {context: split.rows for context, split in lineage.items()} == {
        "training": 55000,
        "validation": 5000,
        "test": 10000,
    }
    assert lineage["validation"].digest == full_splits.validation_digest
    assert len({split.digest for split in full_splits.lineage}) == 3
    assert {split.folder for split in full_splits.lineage} == {raw_mnist.folder}

    def digests(**options):
        settings = {"val_size": 5000, "split_seed": 0} | options
        made = make_splits(raw_mnist, device=CPU, **settings)
        return [split.digest for split in made.lineage]

    same = digests()
    assert same == [split.digest for split in full_splits.lineage]  # same data, same digests
    train, validation, test = same
    assert digests(split_seed=1)[:2] != [train, validation] and digests(split_seed=1)[2] == test
    assert digests(train_limit=100) == [digests(train_limit=100)[0], validation, test]
    assert digests(train_limit=100)[0] != train
    assert digests(test_limit=10)[:2] == [train, validation] and digests(test_limit=10)[2] != test


def test_the_data_folder_is_recorded_as_an_absolute_path(data_dir, raw_mnist):
    assert raw_mnist.folder == str(Path(data_dir).resolve())


def test_split_shapes_and_dtypes(full_splits):
    for split in (full_splits.train, full_splits.validation, full_splits.test):
        assert split.images.shape == (len(split), 1, 28, 28)
        assert split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64
        assert split.images.device == CPU


def test_train_split_is_normalized(full_splits):
    images = full_splits.train.images
    assert abs(images.mean().item()) < 0.01
    assert abs(images.std().item() - 1.0) < 0.01


def test_train_and_validation_partition_the_training_set(full_splits, raw_mnist):
    """Every training image lands in exactly one of train/validation, with its label
    (compared by content, so duplicate images in MNIST are counted, not confused)."""
    expected = row_counts(raw_mnist.train_images.reshape(60000, -1), raw_mnist.train_labels)
    train, validation = full_splits.train, full_splits.validation
    seen = row_counts(
        np.concatenate([to_uint8(train.images), to_uint8(validation.images)]),
        torch.cat([train.labels, validation.labels]).numpy(),
    )
    assert seen == expected


def test_no_image_in_both_train_and_validation(small_splits, raw_mnist):
    raw_images = raw_mnist.train_images.reshape(60000, -1)
    counts = Counter(image.tobytes() for image in raw_images)
    train = Counter(image.tobytes() for image in to_uint8(small_splits.train.images))
    validation = Counter(image.tobytes() for image in to_uint8(small_splits.validation.images))
    for image in set(train) & set(validation):
        # Only an image MNIST itself holds more than once may appear on both sides.
        assert train[image] + validation[image] <= counts[image]


def test_test_split_is_the_test_set_in_order(raw_mnist):
    splits = make_splits(raw_mnist, val_size=100, split_seed=3, device=CPU, test_limit=25)
    np.testing.assert_array_equal(
        to_uint8(splits.test.images), raw_mnist.test_images[:25].reshape(25, -1)
    )
    np.testing.assert_array_equal(splits.test.labels.numpy(), raw_mnist.test_labels[:25])


def test_split_is_seeded(raw_mnist):
    def validation_labels(split_seed):
        splits = make_splits(
            raw_mnist, val_size=500, split_seed=split_seed, device=CPU, train_limit=10, test_limit=1
        )
        return splits.validation.labels

    assert torch.equal(validation_labels(0), validation_labels(0))
    assert not torch.equal(validation_labels(0), validation_labels(1))


def test_train_limit_does_not_change_the_validation_set(raw_mnist, full_splits):
    limited = make_splits(
        raw_mnist, val_size=5000, split_seed=0, device=CPU, train_limit=1000, test_limit=10
    )
    assert torch.equal(limited.validation.images, full_splits.validation.images)
    assert torch.equal(limited.validation.labels, full_splits.validation.labels)
    # The limited training set is a subset of the full one (here: its first images).
    assert torch.equal(limited.train.labels, full_splits.train.labels[:1000])
