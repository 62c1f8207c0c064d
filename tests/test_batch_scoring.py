"""mnist_track.batch_scoring and `mnist-track predict` in-process (CliRunner): IDX files
read as untrusted input, PNG/JPEG files and folders, scored in batches into a CSV, against
a model trained and logged into a SQLite store of this module's own."""

from __future__ import annotations

import gzip
import io
import os
import struct
import sys
import tracemalloc

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import confidence, in_sqlite_store, read_predictions
from PIL import Image

from mnist_track import batch_scoring, console
from mnist_track.batch_scoring import (
    CSV_COLUMNS,
    MAX_IDX_IMAGES,
    Source,
    idx_batches,
    idx_image_count,
    predictions_csv,
    score,
    sources_of,
)
from mnist_track.cli import main
from mnist_track.config import TrainConfig
from mnist_track.runs import train_and_track
from mnist_track.serving import InvalidPixels

MODEL = "batch-model"
N_IMAGES = 60  # real test digits in the IDX files and folders below


def idx_bytes(images: np.ndarray, count: int | None = None, side=(28, 28), dims=3) -> bytes:
    """An IDX file of unsigned bytes; `count` may lie about the number of images."""
    shape = (len(images) if count is None else count, *side)[:dims]
    return b"\x00\x00\x08" + bytes([dims]) + struct.pack(f">{dims}I", *shape) + images.tobytes()


def write(path, content: bytes, compress: bool = False):
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


@pytest.fixture(scope="module")
def logged(tmp_path_factory, small_splits):
    """A store with one tiny trained model, registered as version 1: its tracking URI."""
    with in_sqlite_store(tmp_path_factory.mktemp("batch-store")) as uri:
        train_and_track(
            TrainConfig(epochs=2, hidden_sizes=(64,), lr=3e-3),
            small_splits,
            experiment="batch-scoring",
            registered_model=MODEL,
        )
    return uri


@pytest.fixture(scope="module")
def classifier(logged):
    from mnist_track.model_files import load_classifier

    mlflow.set_tracking_uri(logged)
    return load_classifier(f"models:/{MODEL}/1")


@pytest.fixture(scope="module")
def digits(raw_mnist):
    """(uint8 images (N, 28, 28), labels) of the first N_IMAGES test digits."""
    return raw_mnist.test_images[:N_IMAGES], raw_mnist.test_labels[:N_IMAGES]


@pytest.fixture
def idx_file(tmp_path, digits):
    return write(tmp_path / "digits-idx3-ubyte.gz", idx_bytes(digits[0]), compress=True)


@pytest.fixture
def folder(tmp_path, digits):
    images = tmp_path / "pngs"
    images.mkdir()
    for index, image in enumerate(digits[0]):
        Image.fromarray(image).save(images / f"digit{index:02d}.png")
    (images / "notes.txt").write_text("not an image: folders give PNG/JPEG files only")
    return images


def run_predict(logged, *arguments):
    result = CliRunner().invoke(
        main, ["predict", "-m", f"models:/{MODEL}/1", "--tracking-uri", logged, *arguments]
    )
    return result


# --- reading IDX files -------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_idx_images_are_streamed_in_batches(tmp_path, digits, compress):
    path = write(tmp_path / "images", idx_bytes(digits[0]), compress)
    assert idx_image_count(path) == N_IMAGES
    batches = list(idx_batches(path, batch_size=25))
    assert [len(batch) for batch in batches] == [25, 25, 10]
    np.testing.assert_array_equal(np.concatenate(batches), digits[0].reshape(N_IMAGES, 784))


def test_the_mnist_test_file_is_read_whole(data_dir, raw_mnist):
    path = data_dir / "t10k-images-idx3-ubyte.gz"
    assert idx_image_count(path) == 10_000
    pixels = np.concatenate(list(idx_batches(path)))
    np.testing.assert_array_equal(pixels, raw_mnist.test_images.reshape(10_000, 784))


def refusal(path) -> str:
    with pytest.raises(InvalidPixels) as caught:
        idx_image_count(path)
        list(idx_batches(path))
    return str(caught.value)


@pytest.mark.parametrize(
    ("content", "compress", "fragment"),
    [
        (idx_bytes(np.zeros(10, np.uint8), dims=1), True, "1 dimensions; images are 3"),
        (idx_bytes(np.zeros((1, 32, 32), np.uint8), side=(32, 32)), True, "32x32 pixels"),
        (idx_bytes(np.zeros(0, np.uint8), count=MAX_IDX_IMAGES + 1), True, "declares 1,000,001"),
        (b"\x00\x00\x0d\x03" + bytes(12), True, "not an IDX file of unsigned bytes"),
        (b"\x00\x00\x08\x03\x00\x00", False, "ends inside its IDX header"),
        (idx_bytes(np.zeros((3, 28, 28), np.uint8), count=5), False, "header declares 5 images"),
        (idx_bytes(np.zeros((3, 28, 28), np.uint8), count=2), False, "header declares 2 images"),
        (idx_bytes(np.zeros((3, 28, 28), np.uint8), count=5), True, "ends after 3 of the 5"),
        (idx_bytes(np.zeros((3, 28, 28), np.uint8), count=2), True, "holds more than the 2"),
        (b"plain text, compressed", True, "not an IDX file"),
    ],
    ids=[
        "labels-file",
        "32x32",
        "too-many-images",
        "float-idx",
        "short-header",
        "plain-truncated",
        "plain-trailing-bytes",
        "gzip-truncated",
        "gzip-trailing-bytes",
        "gzip-of-text",
    ],
)
def test_bad_idx_files_say_what_is_wrong(tmp_path, content, compress, fragment):
    path = write(tmp_path / "bad-idx", content, compress)
    message = refusal(path)
    assert fragment in message and str(path) in message


def test_a_corrupt_gzip_stream(tmp_path, digits):
    compressed = bytearray(gzip.compress(idx_bytes(digits[0])))
    compressed[len(compressed) // 2 :] = bytes(len(compressed) - len(compressed) // 2)
    assert "cannot be read or decompressed" in refusal(write(tmp_path / "broken.gz", compressed))


def test_a_gzip_bomb_stops_one_byte_past_its_header(tmp_path):
    """A header of 2 images in front of 64 MiB of zeros: refused after reading 2 images
    and one byte more, not after inflating everything."""
    bomb = gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)) + bytes(64 << 20))
    path = write(tmp_path / "bomb.gz", bomb)
    tracemalloc.start()
    try:
        assert "holds more than the 2 images" in refusal(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"


def test_a_fifo_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    assert "not a regular file" in refusal(tmp_path / "pipe")


def test_sources_tell_idx_files_from_images(tmp_path, idx_file, digits):
    png = tmp_path / "seven"  # a PNG without a suffix is still an image
    Image.fromarray(digits[0][0]).save(png, format="PNG")
    labels = write(tmp_path / "labels.gz", idx_bytes(np.zeros(3, np.uint8), dims=1), True)
    errors: list[str] = []
    sources = sources_of([idx_file, png, tmp_path / "missing.png", labels], errors.append)
    assert sources == [
        Source(idx_file, N_IMAGES, is_idx=True),
        Source(png),
        Source(tmp_path / "missing.png"),  # by its suffix: found missing when it is read
    ]
    assert len(errors) == 1 and "labels.gz: an IDX file of 1 dimensions" in errors[0]


# --- scoring -------------------------------------------------------------------------------


def scored(classifier, sources, batch_size=batch_scoring.BATCH_SIZE):
    stream, errors, progress = io.StringIO(), [], []
    score(
        classifier,
        sources,
        batch_scoring.PredictionsCsv(stream),
        on_error=errors.append,
        on_progress=progress.append,
        batch_size=batch_size,
    )
    return read_predictions(stream.getvalue()), errors, progress


def test_score_writes_a_row_per_image(classifier, idx_file, folder, digits):
    images, labels = digits
    pngs = sorted(folder.glob("*.png"))[:5]
    sources = [Source(idx_file, N_IMAGES, is_idx=True), *map(Source, pngs)]
    rows, errors, progress = scored(classifier, sources, batch_size=16)
    assert errors == []
    assert len(rows) == N_IMAGES + 5 and sum(progress) == N_IMAGES + 5
    assert all(done >= 16 for done in progress[:-1])  # batches, not one image at a time
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(row["source"], int(row["index"])) for row in rows[:N_IMAGES]] == [
        (str(idx_file), index) for index in range(N_IMAGES)
    ]
    assert [row["source"] for row in rows[N_IMAGES:]] == list(map(str, pngs))
    predicted = np.array([int(row["digit"]) for row in rows])
    assert (predicted[:N_IMAGES] == labels).mean() >= 0.8  # a trained model: mostly right
    np.testing.assert_array_equal(predicted[N_IMAGES:], predicted[:5])  # same digits as PNGs
    probabilities = np.array([[float(row[f"p{d}"]) for d in range(10)] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(predicted, probabilities.argmax(axis=1))
    # The served model's own answer for the same pixels.
    served = classifier.predict(None, images.reshape(N_IMAGES, 784).tolist())
    assert predicted[:N_IMAGES].tolist() == served["digit"].tolist()


def test_batch_size_does_not_change_the_answer(classifier, idx_file):
    """Same rows, digits and probabilities; the probabilities to float32's precision, since
    a matrix product is not bitwise the same for every batch shape (the written 6 digits
    can differ in the last)."""
    sources = [Source(idx_file, N_IMAGES, is_idx=True)]
    one_batch = scored(classifier, sources)[0]
    in_sevens = scored(classifier, sources, batch_size=7)[0]
    assert len(in_sevens) == len(one_batch) == N_IMAGES
    probabilities = [f"p{digit}" for digit in range(10)]
    for row, expected in zip(in_sevens, one_batch, strict=True):
        assert {k: v for k, v in row.items() if k not in probabilities} == {
            k: v for k, v in expected.items() if k not in probabilities
        }
        for key in probabilities:
            assert float(row[key]) == pytest.approx(float(expected[key]), rel=1e-4, abs=1e-7)


def test_an_unreadable_file_is_reported_and_the_rest_scored(classifier, folder, tmp_path):
    broken = write(tmp_path / "broken.png", b"\x89PNG\r\n\x1a\n" + bytes(50))
    pngs = sorted(folder.glob("*.png"))[:3]
    rows, errors, _ = scored(classifier, [Source(broken), *map(Source, pngs)])
    assert [row["source"] for row in rows] == list(map(str, pngs))
    assert len(errors) == 1 and "broken.png: not a readable PNG image" in errors[0]


def test_a_csv_file_appears_only_when_whole(tmp_path):
    target = tmp_path / "out.csv"
    with predictions_csv(target) as written:
        written.write([("a.png", 0)], np.eye(10)[[3]])
        assert not target.exists()  # still being written beside it
    assert read_predictions(target.read_text())[0]["digit"] == "3"
    with pytest.raises(KeyboardInterrupt), predictions_csv(tmp_path / "cut.csv") as written:
        written.write([("a.png", 0)], np.eye(10)[[3]])
        raise KeyboardInterrupt
    with predictions_csv(tmp_path / "empty.csv"):
        pass
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.csv"]


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar_only_on_a_terminal(monkeypatch, tty):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(stderr, "isatty", lambda: tty, raising=False)
    with console.progress_bar(10, "scoring") as advance:
        advance(4)
        advance(6)
    assert ("scoring" in stderr.getvalue() and "100%" in stderr.getvalue()) == tty
    assert tty or stderr.getvalue() == ""


# --- `mnist-track predict`, in-process -----------------------------------------------------


def test_predict_an_idx_file_to_a_csv_file(logged, idx_file, digits, tmp_path):
    result = run_predict(logged, str(idx_file), "--output", str(tmp_path / "digits.csv"))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    rows = read_predictions((tmp_path / "digits.csv").read_text())
    assert [int(row["index"]) for row in rows] == list(range(N_IMAGES))
    predicted = np.array([int(row["digit"]) for row in rows])
    assert (predicted == digits[1]).mean() >= 0.8
    assert all(0.1 < confidence(row) <= 1.0 for row in rows)


def test_predict_a_folder_and_an_idx_file_to_stdout(logged, idx_file, folder, digits):
    result = run_predict(logged, str(folder), str(idx_file))
    assert result.exit_code == 0, result.output
    rows = read_predictions(result.stdout)
    assert len(rows) == 2 * N_IMAGES  # the folder's PNGs (not its .txt), then the IDX file
    from_pngs = [int(row["digit"]) for row in rows[:N_IMAGES]]
    from_idx = [int(row["digit"]) for row in rows[N_IMAGES:]]
    assert from_pngs == from_idx
    assert np.mean(np.array(from_idx) == digits[1]) >= 0.8


def test_predict_reports_a_bad_idx_file_and_scores_the_rest(logged, idx_file, tmp_path):
    bad = write(tmp_path / "cut-idx3-ubyte.gz", gzip.compress(idx_bytes(np.zeros(7), count=9)))
    output = tmp_path / "out.csv"
    result = run_predict(logged, str(bad), str(idx_file), "-o", str(output))
    assert result.exit_code == 1
    assert "Error: " in result.stderr and "cut-idx3-ubyte.gz: " in result.stderr
    assert len(read_predictions(output.read_text())) == N_IMAGES


def test_predict_with_nothing_readable_writes_nothing(logged, tmp_path):
    bad = write(tmp_path / "labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8), dims=1))
    result = run_predict(logged, str(bad), "-o", str(tmp_path / "out.csv"))
    assert result.exit_code == 1
    assert "none of the 1 inputs could be read" in result.stderr
    assert result.stdout == "" and not (tmp_path / "out.csv").exists()
