"""Bounded fuzzing of the served model's input decoding with Hypothesis: random JSON
shapes (as MLflow's scoring server parses them and as Python callers pass them), random
base64 strings, and truncated, mutated and resized PNG/JPEG files.

Each call has two possible outcomes: prediction-ready pixels (float32, N x 784, N at most
MAX_IMAGES, every value in 0..255) or InvalidPixels with a short one-line message. Any
other exception fails the test. Each call must also stay within the documented cost of one
request: time (time.perf_counter) and the memory Python and numpy allocate (tracemalloc).
Pillow's own pixel buffers are not seen by tracemalloc; they are bounded by the pixel cap,
which is checked from the header before anything is decoded (test_serving_limits.py).

600 examples in all, so the file runs in seconds; `--hypothesis-seed` replays a
failure."""

from __future__ import annotations

import base64
import string
import time
import tracemalloc

import numpy as np
import pytest
from bad_images import encode, exactly_784_bytes, png_declaring
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.utils.proto_json_utils import parse_tf_serving_input
from PIL import Image

from mnist_track.serving import (
    MAX_IMAGES,
    MAX_MESSAGE,
    InvalidPixels,
    decode_images,
    image_file_to_pixels,
    model_signature,
)

# The documented cost (README, "Limits"): up to ~25 ms and ~5 MB per file; a fuzzed input
# holds at most 4 small files, and the margin is for a busy shared 2-core machine.
SECONDS_PER_CALL = 1.0
PYTHON_BYTES_PER_CALL = 32 * 2**20

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

FUZZ = settings(
    max_examples=150,
    deadline=None,  # timed by the test itself, against the documented cost
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SCHEMA = model_signature().inputs


def decode_within_budget(call, *args) -> np.ndarray | None:
    """call(*args): pixels, or None when refused; asserts the outcome and the cost."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        pixels = call(*args)
    except InvalidPixels as error:
        pixels = None
        message = str(error)
        assert 0 < len(message) <= MAX_MESSAGE and "\n" not in message, message
        assert "Traceback" not in message
    finally:
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < SECONDS_PER_CALL, f"{seconds:.2f} s"
    assert peak < PYTHON_BYTES_PER_CALL, f"{peak / 2**20:.1f} MiB"
    if pixels is not None:
        assert isinstance(pixels, np.ndarray) and pixels.dtype == np.float32
        assert pixels.shape[-1] == 784
        assert pixels.ndim == (1 if call is image_file_to_pixels else 2)
        assert 1 <= len(pixels) <= (784 if pixels.ndim == 1 else MAX_IMAGES)
        assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 255
    return pixels


def strings(items) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    for index, item in enumerate(items):
        array[index] = item
    return array


# --- random JSON -----------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(0, 255)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=60,
)


@st.composite
def near_images(draw) -> list:
    """Near misses: 1-3 images of 783-785 zeros (or 28 rows) with a few odd values."""
    square = draw(st.booleans())
    images = []
    for _ in range(draw(st.integers(1, 3))):
        image: list = [0] * (784 if square else draw(st.sampled_from([783, 784, 784, 785])))
        changes = st.tuples(st.integers(0, len(image) - 1), st.integers(0, 255) | scalars)
        for index, value in draw(st.lists(changes, max_size=4)):
            image[index] = value
        images.append([image[row * 28 : row * 28 + 28] for row in range(28)] if square else image)
    return images


@FUZZ
@given(value=json_values | near_images())
def test_random_json_is_pixels_or_a_short_refusal(value):
    decode_within_budget(decode_images, value)  # as a Python caller passes it
    try:  # as MLflow's scoring server hands `{"inputs": value}` to the model
        parsed = parse_tf_serving_input({"inputs": value}, schema=SCHEMA)
    except MlflowException:
        return  # refused by MLflow before the model, with its own 400
    decode_within_budget(decode_images, parsed)


# --- random base64 strings --------------------------------------------------------------

BASE64_ALPHABET = string.ascii_letters + string.digits + "+/="
base64_strings = (
    st.text(alphabet=BASE64_ALPHABET, max_size=1500)
    | st.text(max_size=200)
    | st.binary(max_size=1200).map(lambda raw: base64.b64encode(raw).decode())
    | st.binary(min_size=784, max_size=784).map(lambda raw: base64.b64encode(raw).decode())
    | st.binary(max_size=100).map(lambda raw: base64.b64encode(b"\x89PNG\r\n\x1a\n" + raw))
    | st.binary(max_size=100).map(lambda raw: base64.b64encode(b"\xff\xd8\xff" + raw))
)


@FUZZ
@given(items=st.lists(base64_strings, min_size=1, max_size=4))
def test_random_base64_is_pixels_or_a_short_refusal(items):
    decode_within_budget(decode_images, strings(items))
    decode_within_budget(decode_images, items)


# --- mutated PNG and JPEG files ---------------------------------------------------------


def seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    noise = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    gray, colour = Image.fromarray(digit), Image.fromarray(noise)
    return [
        encode(gray, "PNG"),
        encode(colour, "PNG", optimize=True),
        encode(colour.convert("RGBA"), "PNG"),
        encode(colour.convert("P"), "PNG"),
        encode(gray.convert("I;16"), "PNG"),
        encode(gray.convert("LA"), "PNG"),
        encode(gray.convert("1"), "PNG"),
        encode(gray, "JPEG", quality=90),
        encode(colour, "JPEG", progressive=True),
        encode(colour.convert("CMYK"), "JPEG"),
        exactly_784_bytes(digit, "PNG"),
        exactly_784_bytes(digit, "JPEG"),
    ]


SEEDS = seed_files()


@st.composite
def mutated_files(draw) -> bytes:
    content = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["truncate", "flip", "insert", "repeat", "size"]))
        at = draw(st.integers(0, max(len(content) - 1, 0)))
        if operation == "truncate":
            del content[max(at, 1) :]
        elif operation == "flip":
            content[at : at + 1] = bytes([draw(st.integers(0, 255))])
        elif operation == "insert":
            content[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "repeat":  # repeated chunks, segments and scans
            span = draw(st.integers(1, 64))
            content[at:at] = content[at : at + span] * draw(st.integers(1, 50))
        elif operation == "size" and content[:4] == b"\x89PNG" and len(content) > 24:
            content[16:24] = draw(st.binary(min_size=8, max_size=8))  # IHDR width, height
    return bytes(content)


@FUZZ
@given(content=mutated_files())
def test_mutated_files_are_pixels_or_a_short_refusal(content):
    decode_within_budget(image_file_to_pixels, content, "fuzzed")
    decode_within_budget(decode_images, strings([base64.b64encode(content).decode()]))


@FUZZ
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_declared_sizes_never_cost_more_than_the_cap(width, height):
    content = png_declaring(width, height, rows=0)  # a header, no pixel data
    pixels = decode_within_budget(image_file_to_pixels, content, "declared")
    if width * height > 1024 * 1024:
        assert pixels is None


@pytest.mark.parametrize("content", SEEDS, ids=range(len(SEEDS)))
def test_seed_files_are_readable(content):
    """The fuzzer starts from valid files: each decodes to pixels."""
    assert decode_within_budget(image_file_to_pixels, content, "seed") is not None
