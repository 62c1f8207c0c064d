"""Unit tests for mnist_track.serving: decoding request inputs, and the pyfunc model called
directly (no MLflow server)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from safetensors.torch import save_file

from mnist_track.config import TrainConfig
from mnist_track.models import architecture_of
from mnist_track.pixels import normalize_pixels
from mnist_track.serving import (
    MAX_IMAGES,
    DigitClassifier,
    InvalidPixels,
    decode_images,
    image_file_to_pixels,
)
from mnist_track.train import fit


@pytest.fixture(scope="module")
def digits(raw_mnist) -> np.ndarray:
    """Three real test images, uint8 (3, 28, 28)."""
    return raw_mnist.test_images[:3]


def expected_pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), 784).astype(np.float32)


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode("ascii")


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def strings(*items) -> np.ndarray:
    """A 1-D object array, as MLflow hands a JSON list of strings to the model."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


# --- accepted inputs ---------------------------------------------------------------------


def test_flat_lists(digits):
    decoded = decode_images(expected_pixels(digits).astype(int).tolist())
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, expected_pixels(digits))


def test_nested_28_by_28_lists(digits):
    decoded = decode_images(digits.astype(int).tolist())
    np.testing.assert_array_equal(decoded, expected_pixels(digits))


def test_single_image_without_batch_list(digits):
    flat = decode_images(digits[0].reshape(784).tolist())
    square = decode_images(digits[0].tolist())
    np.testing.assert_array_equal(flat, expected_pixels(digits[:1]))
    np.testing.assert_array_equal(square, expected_pixels(digits[:1]))


def test_numpy_arrays(digits):
    np.testing.assert_array_equal(decode_images(digits), expected_pixels(digits))
    as_objects = digits.reshape(3, 784).astype(object)  # JSON numbers under an object schema
    np.testing.assert_array_equal(decode_images(as_objects), expected_pixels(digits))


def test_float_pixels_in_range_are_kept():
    decoded = decode_images([[0.5] * 784])
    assert decoded[0, 0] == 0.5


def test_base64_raw_bytes(digits):
    encoded = strings(*(b64(image.tobytes()) for image in digits))
    np.testing.assert_array_equal(decode_images(encoded), expected_pixels(digits))
    as_bytes = strings(*(b64(image.tobytes()).encode() for image in digits))
    np.testing.assert_array_equal(decode_images(as_bytes), expected_pixels(digits))


def test_base64_in_a_plain_list(digits):
    decoded = decode_images([b64(image.tobytes()) for image in digits])
    np.testing.assert_array_equal(decoded, expected_pixels(digits))


def test_base64_png_white_digit_on_black(digits):
    decoded = decode_images(strings(b64(png(digits[0]))))
    np.testing.assert_array_equal(decoded, expected_pixels(digits[:1]))


def test_png_dark_digit_on_white_is_inverted(digits):
    on_paper = 255 - digits[0]
    pixels = image_file_to_pixels(png(on_paper), "paper.png")
    assert pixels.shape == (784,)
    np.testing.assert_array_equal(pixels, expected_pixels(digits[:1])[0])
    decoded = decode_images(strings(b64(png(on_paper))))
    np.testing.assert_array_equal(decoded[0], pixels)


def test_png_in_colour_and_larger_is_resized(digits):
    large = np.kron(digits[1], np.ones((3, 3), dtype=np.uint8))  # 84x84
    pixels = image_file_to_pixels(png(large, mode="RGB"), "big.png")
    assert pixels.shape == (784,)
    original = expected_pixels(digits[1:2])[0]
    assert np.corrcoef(pixels, original)[0, 1] > 0.95
    assert np.abs(pixels - original).mean() < 10


def test_jpeg_is_read(digits):
    buffer = io.BytesIO()
    Image.fromarray(digits[2]).save(buffer, format="JPEG", quality=95)
    pixels = image_file_to_pixels(buffer.getvalue(), "digit.jpg")
    assert np.abs(pixels - expected_pixels(digits[2:3])[0]).mean() < 10


def test_dataframe_inputs(digits):
    expected = expected_pixels(digits)
    wide = pd.DataFrame(expected.astype(int))  # 784 numeric columns
    np.testing.assert_array_equal(decode_images(wide), expected)
    encoded = pd.DataFrame({"image": [b64(image.tobytes()) for image in digits]})
    np.testing.assert_array_equal(decode_images(encoded), expected)
    lists = pd.DataFrame({"image": [row.tolist() for row in expected]})
    np.testing.assert_array_equal(decode_images(lists), expected)


# --- rejected inputs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_input", "fragments"),
    [
        ([[0] * 783], ["784", "(1, 783)"]),
        ([[[0] * 27] * 28], ["28 rows of 28", "(1, 28, 27)"]),
        ([1, 2, 3], ["784", "(3,)"]),
        ([[0] * 784, [0] * 783], ["same shape"]),
        ([[0] * 28] * 27 + [[0] * 27], ["same shape"]),
        ([["a"] * 784], ["numbers"]),
        ([[None] * 784], ["numbers"]),
        ([[0] * 783 + [-1]], ["0..255", "image 0, pixel 783", "-1"]),
        ([[0] * 784, [0] * 5 + [256] + [0] * 778], ["0..255", "image 1, pixel 5", "256"]),
        ([[float("nan")] * 784], ["0..255", "nan", "784 bad values"]),
        ([[float("inf")] + [0] * 783], ["0..255", "inf"]),
        ([], ["non-empty"]),
        (np.zeros((0, 784)), ["non-empty"]),
        ({"pixels": [0] * 784}, ["named fields", "inputs"]),
        (strings("not base64!"), ["image 0", "base64"]),
        (strings(b64(bytes(784)), b64(b"garbage")), ["image 1", "PNG/JPEG", "7 bytes"]),
    ],
    ids=[
        "783-values",
        "28x27",
        "3-values",
        "ragged-images",
        "ragged-rows",
        "text",
        "null",
        "negative",
        "above-255",
        "nan",
        "inf",
        "empty-list",
        "empty-array",
        "dict",
        "bad-base64",
        "base64-not-an-image",
    ],
)
def test_bad_inputs_say_what_is_wrong(model_input, fragments):
    with pytest.raises(InvalidPixels) as caught:
        decode_images(model_input)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_too_many_images():
    with pytest.raises(InvalidPixels, match=f"at most {MAX_IMAGES:,}"):
        decode_images(np.zeros((MAX_IMAGES + 1, 784), dtype=np.float32))
    with pytest.raises(InvalidPixels, match=f"got {MAX_IMAGES + 1:,}"):
        decode_images(strings(*["AA=="] * (MAX_IMAGES + 1)))
    assert decode_images(np.zeros((MAX_IMAGES, 784), dtype=np.float32)).shape == (MAX_IMAGES, 784)


def test_unreadable_image_file():
    with pytest.raises(InvalidPixels, match="upload.png"):
        image_file_to_pixels(b"\x89PNG\r\n\x1a\nbroken", "upload.png")


# --- DigitClassifier without MLflow serving ----------------------------------------------


@pytest.fixture(scope="module")
def classifier(small_splits, tmp_path_factory):
    config = TrainConfig(hidden_sizes=(64,), epochs=2, lr=3e-3, seed=0)
    trained = fit(config, small_splits).model
    folder = tmp_path_factory.mktemp("model")
    weights, architecture = folder / "model.safetensors", folder / "architecture.json"
    save_file(trained.state_dict(), str(weights))
    architecture.write_text(json.dumps(architecture_of(config)))
    model = DigitClassifier.from_data_files({"weights": weights, "architecture": architecture})
    return model, trained


def test_classifier_predicts_real_digits(classifier, raw_mnist):
    model, trained = classifier
    images = raw_mnist.test_images[:200]
    result = model.predict(None, images.reshape(200, 784).tolist())
    assert isinstance(result, pd.DataFrame)
    assert list(result.columns) == ["digit", "probabilities"]
    assert len(result) == 200
    probabilities = np.array(result["probabilities"].tolist())
    assert probabilities.shape == (200, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert (probabilities >= 0).all()
    np.testing.assert_array_equal(result["digit"].to_numpy(), probabilities.argmax(axis=1))
    # A trained model: most test digits right.
    assert (result["digit"].to_numpy() == raw_mnist.test_labels[:200]).mean() > 0.6

    # Same numbers as the trained network on the training pipeline's preprocessing.
    with torch.inference_mode():
        logits = trained(normalize_pixels(torch.from_numpy(images)))
    np.testing.assert_allclose(probabilities, torch.softmax(logits, dim=1).numpy(), atol=1e-5)


def test_classifier_gives_the_same_answer_for_every_encoding(classifier, digits):
    model, _ = classifier
    reference = model.predict(None, digits.tolist())
    for model_input in (
        expected_pixels(digits).tolist(),
        strings(*(b64(image.tobytes()) for image in digits)),
        strings(*(b64(png(255 - image)) for image in digits)),
        pd.DataFrame({"image": [b64(image.tobytes()) for image in digits]}),
    ):
        result = model.predict(None, model_input)
        assert result["digit"].tolist() == reference["digit"].tolist()
        np.testing.assert_allclose(
            np.array(result["probabilities"].tolist()),
            np.array(reference["probabilities"].tolist()),
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "model_input",
    [[[0] * 783], [[300] * 784], [], strings("%%%"), {"a": [1]}],
    ids=["shape", "range", "empty", "base64", "dict"],
)
def test_classifier_bad_input_is_invalid_parameter(classifier, model_input):
    model, _ = classifier
    with pytest.raises(MlflowException) as caught:
        model.predict(None, model_input)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.get_http_status_code() == 400


def test_classifier_leaves_the_callers_array_unchanged(classifier, digits):
    model, _ = classifier
    pixels = expected_pixels(digits)
    before = pixels.copy()
    first = model.predict(None, pixels)
    np.testing.assert_array_equal(pixels, before)
    second = model.predict(None, pixels)  # a second call must see the same pixels
    assert first["digit"].tolist() == second["digit"].tolist()
