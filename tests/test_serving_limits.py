"""The served model's caps on untrusted input (mnist_track.serving): how many images, how
large a file, how many pixels, which formats, and what a refusal says: short, one line,
no traceback, nothing of the input echoed back."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bad_images import (
    exactly_784_bytes,
    fuzzed_dds,
    jpeg,
    jpeg_scan_bomb,
    other_formats,
    pad_png,
    png,
    png_bomb,
    png_declaring,
)
from conftest import REPO_ROOT
from PIL import Image

from mnist_track import serving
from mnist_track.errors import MnistTrackError
from mnist_track.serving import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_FILES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    MAX_JPEG_SCANS,
    MAX_MESSAGE,
    DigitClassifier,
    InvalidPixels,
    RefusedInput,
    decode_images,
    image_file_to_pixels,
    read_image_file,
)


@pytest.fixture(scope="module")
def digit(raw_mnist) -> np.ndarray:
    """A real test digit (a 7), uint8 28x28."""
    return raw_mnist.test_images[0]


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode("ascii")


def strings(*items) -> np.ndarray:
    """A 1-D object array, as MLflow hands a JSON list of strings to the model."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def refusal(model_input) -> str:
    with pytest.raises(InvalidPixels) as caught:
        decode_images(model_input)
    message = str(caught.value)
    assert len(message) <= MAX_MESSAGE and "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def decoded_files(monkeypatch) -> list[str]:
    """The labels of the files image_file_to_pixels was asked to decode."""
    calls: list[str] = []
    original = serving.image_file_to_pixels

    def counting(content, label):
        calls.append(label)
        return original(content, label)

    monkeypatch.setattr(serving, "image_file_to_pixels", counting)
    return calls


# --- the caps are what the README says --------------------------------------------------


def test_caps_are_documented_in_the_readme():
    section = (REPO_ROOT / "README.md").read_text().split("## Serving the model")[1]
    section = section.split("\n## ")[0]
    assert f"{MAX_IMAGES:,} images" in section
    assert f"{MAX_IMAGE_FILES} of them PNG/JPEG" in section
    assert f"{MAX_IMAGE_BYTES // 1024} KiB" in section
    assert f"{MAX_IMAGE_PIXELS:,} pixels" in section
    assert f"{MAX_JPEG_SCANS} scans" in section
    assert "client_max_body_size" in section


# --- counts, checked before anything is decoded -----------------------------------------


def test_too_many_images_is_refused_before_any_is_decoded(digit, decoded_files):
    images = [b64(png(digit))] + [b64(digit.tobytes())] * MAX_IMAGES
    assert f"at most {MAX_IMAGES:,} images" in refusal(strings(*images))
    assert decoded_files == []
    assert f"at most {MAX_IMAGES:,}" in refusal([[0] * 784] * (MAX_IMAGES + 1))


def test_too_many_files_is_refused_before_any_is_decoded(digit, decoded_files):
    files = [b64(png(digit))] * (MAX_IMAGE_FILES + 1)
    message = refusal(strings(*files))
    assert f"at most {MAX_IMAGE_FILES} PNG/JPEG images" in message and "raw pixels" in message
    assert decoded_files == []


def test_a_bad_string_is_found_before_any_file_is_decoded(digit, decoded_files):
    assert "image 2" in refusal(strings(b64(png(digit)), b64(digit.tobytes()), b64(b"x" * 5)))
    assert decoded_files == []


def test_the_most_a_request_may_hold_is_accepted(digit):
    worst_file = pad_png(png(np.kron(digit, np.ones((36, 36), dtype=np.uint8))), MAX_IMAGE_BYTES)
    images = [b64(worst_file)] * MAX_IMAGE_FILES
    images += [b64(digit.tobytes())] * (MAX_IMAGES - MAX_IMAGE_FILES)
    pixels = decode_images(strings(*images))
    assert pixels.shape == (MAX_IMAGES, 784)
    assert np.abs(pixels[0] - digit.reshape(784)).mean() < 10  # the 1008x1008 digit, shrunk
    np.testing.assert_array_equal(pixels[-1], digit.reshape(784))


# --- bytes per file ---------------------------------------------------------------------


def test_bytes_per_file(digit):
    at_cap = pad_png(png(digit), MAX_IMAGE_BYTES)
    np.testing.assert_array_equal(image_file_to_pixels(at_cap, "ok.png"), digit.reshape(784))
    assert decode_images(strings(b64(at_cap))).shape == (1, 784)

    over = pad_png(png(digit), MAX_IMAGE_BYTES + 1)
    with pytest.raises(InvalidPixels, match=f"over.png: {MAX_IMAGE_BYTES + 1:,} bytes"):
        image_file_to_pixels(over, "over.png")
    # As base64: the decoded length, then (a longer one) the string's, before decoding it.
    assert f"image 0: {MAX_IMAGE_BYTES + 1:,} bytes; at most" in refusal(strings(b64(over)))
    longer = strings(b64(pad_png(png(digit), MAX_IMAGE_BYTES + 3)))
    assert f"at most {MAX_IMAGE_BYTES:,} bytes" in refusal(longer)
    message = refusal(strings("!" * (1 << 20)))  # 1 MiB, not even base64
    assert "1,048,576 base64 characters" in message and "!!!!" not in message


# --- pixels per file, read from the header before decoding ------------------------------


def test_pixels_per_file(digit):
    side = 1024
    assert side * side == MAX_IMAGE_PIXELS
    at_cap = png(np.kron(digit, np.ones((37, 37), dtype=np.uint8))[:side, :side])
    assert image_file_to_pixels(at_cap, "ok.png").shape == (784,)
    with pytest.raises(InvalidPixels, match=r"wide.png: 1025x1024 pixels; at most 1,048,576"):
        image_file_to_pixels(png_declaring(side + 1, side), "wide.png")


def test_size_is_refused_before_the_pixels_are_decoded(monkeypatch):
    # The file holds one row of the 1025x1024 it declares: decoding it would fail with
    # "truncated"; the refusal names the declared size, so nothing was decoded.
    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "convert", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(InvalidPixels, match="1025x1024 pixels"):
        image_file_to_pixels(png_declaring(1025, 1024), "declared.png")


def test_decompression_bombs_are_refused_quickly():
    bomb = png_bomb()  # 12,000 x 12,000: 144 MB once decoded
    assert len(bomb) < MAX_IMAGE_BYTES
    started = time.perf_counter()
    with (
        pytest.warns(Image.DecompressionBombWarning),  # Pillow's warning; ours refuses
        pytest.raises(InvalidPixels, match="12000x12000 pixels"),
    ):
        image_file_to_pixels(bomb, "bomb.png")
    assert time.perf_counter() - started < 0.5
    # Beyond Pillow's own limit, Pillow refuses in Image.open: the same short refusal.
    message = refusal(strings(b64(png_declaring(100_000, 100_000))))
    assert message == "image 0: declares far more than the 1,048,576 pixels allowed per image"


def test_jpeg_with_too_many_scans(digit):
    bomb = jpeg_scan_bomb()
    assert len(bomb) < MAX_IMAGE_BYTES
    with pytest.raises(InvalidPixels, match=f"more than {MAX_JPEG_SCANS} scans"):
        image_file_to_pixels(bomb, "scans.jpg")
    progressive = jpeg(digit, progressive=True, quality=95)
    assert np.abs(image_file_to_pixels(progressive, "ok.jpg") - digit.reshape(784)).mean() < 10


# --- formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(other_formats()))
def test_only_png_and_jpeg_are_decoded(kind):
    content = other_formats()[kind]
    with pytest.raises(InvalidPixels, match=f"x.{kind.lower()}: not a PNG or JPEG file"):
        image_file_to_pixels(content, f"x.{kind.lower()}")
    assert "neither 784 raw pixels nor a PNG/JPEG file" in refusal(strings(b64(content)))


def test_fuzzed_dds_gets_a_short_refusal():
    assert "image 0:" in refusal(strings(b64(fuzzed_dds())))


def test_a_signature_does_not_choose_the_decoder(digit):
    """A GIF behind a PNG signature is refused by the PNG decoder, not read as a GIF."""
    disguised = b"\x89PNG\r\n\x1a\n" + other_formats()["GIF"]
    with pytest.raises(InvalidPixels, match="x.png: not a readable PNG image"):
        image_file_to_pixels(disguised, "x.png")


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_a_784_byte_file_is_read_as_a_file_not_as_raw_pixels(digit, kind):
    content = exactly_784_bytes(digit, kind)
    assert len(content) == 784
    pixels = decode_images(strings(b64(content)))
    assert np.abs(pixels[0] - digit.reshape(784)).mean() < 10  # the digit, not its bytes
    broken = content[:100] + bytes(684)
    assert f"not a readable {kind} image" in refusal(strings(b64(broken)))


def test_raw_pixels_are_still_raw(digit):
    np.testing.assert_array_equal(decode_images(strings(b64(digit.tobytes())))[0], digit.ravel())


# --- numbers are numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_input", "fragment"),
    [
        ([["1"] * 784], "image 0, pixel 0 is the string '1'"),
        ([[0] * 783 + ["255"]], "image 0, pixel 783 is the string '255'"),
        ([[True] * 784], "is the boolean True"),
        ([[0] * 783 + [False]], "image 0, pixel 783 is the boolean False"),
        ([[[0] * 28] * 27 + [[0] * 27 + [True]]], "is the boolean True"),
        ([[0] * 783 + [None]], "pixel 783 is null"),
        ([[0] * 783 + [{"a": 1}]], "pixel 783 is a dict"),
        (np.array([["7"] * 784]), "numbers 0..255"),
        (np.ones((1, 784), dtype=bool), "numbers 0..255"),
        (np.ones((1, 784), dtype=complex), "numbers 0..255"),
        ([[0] * 784, "AAAA"], "not a mix"),
    ],
    ids=[
        "numeric-strings",
        "one-numeric-string",
        "booleans",
        "one-boolean",
        "boolean-in-28x28",
        "null",
        "object",
        "numpy-strings",
        "numpy-booleans",
        "numpy-complex",
        "strings-and-arrays",
    ],
)
def test_only_numbers_are_pixels(model_input, fragment):
    assert fragment in refusal(model_input)
    if isinstance(model_input, list):  # as MLflow hands JSON to the model: object arrays
        as_objects = np.empty(len(model_input), dtype=object)
        for index, item in enumerate(model_input):
            as_objects[index] = item
        assert refusal(as_objects)


def test_numpy_numbers_of_any_width_are_pixels(digit):
    for dtype in (np.uint8, np.int16, np.int64, np.float16, np.float64):
        np.testing.assert_array_equal(decode_images(digit.astype(dtype))[0], digit.ravel())
    as_objects = digit.reshape(1, 784).astype(np.int64).astype(object)
    np.testing.assert_array_equal(decode_images(as_objects)[0], digit.ravel())


def test_huge_integers_are_out_of_range_not_errors():
    assert "0..255" in refusal([[10**400] + [0] * 783])


# --- what a refusal says ----------------------------------------------------------------


@pytest.mark.parametrize(
    "model_input",
    [
        [[[[[[[[0]]]]]]]],
        np.zeros((1,) * 40, dtype=object),
        {"x" * 100_000: 1},
        strings("A" * 80_000 + "!"),
        [[0] * 783 + ["x" * 100_000]],
    ],
    ids=["nested", "40-dimensions", "long-field-name", "long-bad-base64", "long-string-pixel"],
)
def test_refusals_are_short_and_quote_no_input(model_input):
    message = refusal(model_input)
    assert "x" * 30 not in message and "A" * 30 not in message


def test_refused_input_keeps_its_message():
    """MLflow's scoring server rewrites an MlflowException's message to quote the whole
    input ("Failed to predict data '...'"): a RefusedInput keeps its own."""
    error = RefusedInput("image 0: not a PNG or JPEG file (5 bytes)")
    error.message = f"Failed to predict data '{'A' * 1_000_000}'. \nError: {error.message}"
    body = json.loads(error.serialize_as_json())
    assert body["message"] == "image 0: not a PNG or JPEG file (5 bytes)"
    assert "stack_trace" not in body
    assert error.get_http_status_code() == 400
    assert len(RefusedInput("x" * 10_000).message) == MAX_MESSAGE


def test_predict_refuses_with_refused_input_and_hides_bugs(monkeypatch):
    model = DigitClassifier()  # decoding fails before the network is needed
    with pytest.raises(RefusedInput) as caught:
        model.predict(None, [[True] * 784])
    assert caught.value.get_http_status_code() == 400

    def broken(model_input):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(serving, "decode_images", broken)
    with pytest.raises(RefusedInput) as caught:
        model.predict(None, [[0] * 784])
    assert caught.value.get_http_status_code() == 500
    body = json.loads(caught.value.serialize_as_json())
    assert "secret" not in body["message"] and "stack_trace" not in body


def test_invalid_pixels_is_an_expected_error():
    assert issubclass(InvalidPixels, MnistTrackError)


# --- files for predict ------------------------------------------------------------------


def test_read_image_file_reads_a_regular_file(tmp_path, digit):
    path = tmp_path / "digit.png"
    path.write_bytes(png(digit))
    assert read_image_file(path) == png(digit)


def test_read_image_file_refuses_a_fifo_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: outcome.append(_refusal_of(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "read_image_file blocked on a FIFO"
    assert "not a regular file" in str(outcome[0])


def test_read_image_file_refuses_devices_and_folders(tmp_path):
    assert "not a regular file" in str(_refusal_of(Path("/dev/zero")))
    assert "not a regular file" in str(_refusal_of(tmp_path))
    assert "No such file" in str(_refusal_of(tmp_path / "missing.png"))


def test_read_image_file_reads_at_most_the_cap(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as file:
        file.truncate(1 << 40)  # a sparse terabyte: reading it all would never end
    started = time.perf_counter()
    assert re.search(f"larger than {MAX_IMAGE_BYTES:,} bytes", str(_refusal_of(huge)))
    assert time.perf_counter() - started < 1


def _refusal_of(path: Path) -> InvalidPixels:
    with pytest.raises(InvalidPixels) as caught:
        read_image_file(path)
    return caught.value
