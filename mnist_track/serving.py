"""The served model: raw pixels in, a digit and ten probabilities out.

MLflow builds it from `model_code.py` (models-from-code): the architecture is JSON, the
weights are safetensors, and this package travels with the model as code, so nothing is
unpickled when it loads. Preprocessing lives here, so clients never see the
normalization constants.

Accepted inputs, per image (all with `{"inputs": [...]}` or `{"instances": [...]}`):
- 784 numbers, or 28 rows of 28 numbers, each 0..255 (plain JSON arrays);
- a base64 string of the 784 raw uint8 pixels, row-major (compact: ~4x smaller, fast);
- a base64 string of a PNG/JPEG file (any size; grayscale-converted and resized to 28x28).
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import Array

from mnist_track.data import normalize_pixels
from mnist_track.models import IMAGE_SIDE, build_model

WEIGHTS_ARTIFACT = "weights"
ARCHITECTURE_ARTIFACT = "architecture"
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
MAX_BATCH = 10_000  # a bound on one request's work


class InvalidPixels(ValueError):
    """A request's images cannot be read; the message says which and why."""


def model_signature() -> ModelSignature:
    # One object tensor of any shape: MLflow cannot express "784 or 28x28 numbers, or a
    # base64 string" in a schema, so `decode_images` checks shape, type and range itself.
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema([ColSpec("long", "digit"), ColSpec(Array("double"), "probabilities")]),
    )


def decode_images(model_input) -> np.ndarray:
    """Any accepted input -> uint8-valued float32 pixels (N, 784). Raises InvalidPixels."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_numpy()
        if model_input.ndim == 2 and model_input.shape[1] == 1:
            model_input = model_input[:, 0]  # one column of strings or of arrays
    if isinstance(model_input, dict):
        raise InvalidPixels(
            f"expected a list of images, got named fields {sorted(model_input)}; "
            'send {"inputs": [image, ...]}'
        )
    if (
        isinstance(model_input, (list, tuple))
        and model_input
        and all(isinstance(item, (str, bytes)) for item in model_input)
    ):
        model_input = np.array(model_input, dtype=object)
    array = model_input if isinstance(model_input, np.ndarray) else _as_array(model_input)
    if array.ndim == 0 or len(array) == 0:
        raise InvalidPixels("expected a non-empty list of images")
    if len(array) > MAX_BATCH:
        raise InvalidPixels(f"at most {MAX_BATCH} images per request, got {len(array)}")
    if array.dtype == object and array.ndim == 1:
        if all(isinstance(item, (str, bytes)) for item in array):
            return np.stack([_decode_encoded(item, index) for index, item in enumerate(array)])
        array = _as_array(array.tolist())  # rows of numbers that arrived as objects
    return _check_pixels(array)


def _as_array(values) -> np.ndarray:
    try:
        if isinstance(values, np.ndarray):
            return values.astype(np.float32)  # one C loop, no Python lists
        return np.asarray(values, dtype=np.float32)
    except ValueError as error:
        if "inhomogeneous" in str(error) or "sequence" in str(error):
            raise InvalidPixels(
                "images must all have the same shape: 784 values or 28 rows of 28 values each"
            ) from None
        raise InvalidPixels(f"pixel values must be numbers 0..255: {error}") from None
    except TypeError as error:
        raise InvalidPixels(f"pixel values must be numbers 0..255: {error}") from None


def _check_pixels(array: np.ndarray) -> np.ndarray:
    if array.dtype == object:
        array = _as_array(array)  # MLflow hands JSON numbers over as an object array
    if array.ndim == 1 and array.shape[0] == N_PIXELS or array.shape == (IMAGE_SIDE, IMAGE_SIDE):
        array = array[np.newaxis]  # a single image sent without the batch list
    if not (
        array.ndim == 2
        and array.shape[1] == N_PIXELS
        or array.ndim == 3
        and array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE)
    ):
        raise InvalidPixels(
            f"each image must be 784 values or 28 rows of 28 values; got an array of shape "
            f"{tuple(array.shape)}"
        )
    array = array.reshape(len(array), N_PIXELS).astype(np.float32, copy=False)
    bad = ~np.isfinite(array) | (array < 0) | (array > 255)
    if bad.any():
        image, pixel = np.argwhere(bad)[0]
        raise InvalidPixels(
            f"pixel values must be numbers in 0..255; image {image}, pixel {pixel} is "
            f"{array[image, pixel]!r} ({int(bad.sum())} bad values in all)"
        )
    return array


def _decode_encoded(item: str | bytes, index: int) -> np.ndarray:
    try:
        raw = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidPixels(
            f"image {index}: a string must be base64 (raw pixels or PNG/JPEG)"
        ) from None
    if len(raw) == N_PIXELS:
        return np.frombuffer(raw, dtype=np.uint8).astype(np.float32)
    return image_file_to_pixels(raw, f"image {index}")


def image_file_to_pixels(content: bytes, label: str) -> np.ndarray:
    """PNG/JPEG bytes -> float32 pixels (784,), white digit on black as in MNIST: a picture
    with a light background (a dark digit on paper) is inverted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as image:
            gray = image.convert("L")
            if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
                gray = gray.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
            pixels = np.asarray(gray, dtype=np.float32).reshape(N_PIXELS)
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidPixels(
            f"{label}: not 784 raw bytes and not a readable PNG/JPEG image ({len(content)} bytes)"
        ) from None
    border = np.concatenate([pixels[:IMAGE_SIDE], pixels[-IMAGE_SIDE:]])
    return 255.0 - pixels if border.mean() > 127 else pixels


class DigitClassifier(PythonModel):
    """pyfunc model: preprocessing + network + softmax."""

    # The input formats are checked by decode_images, not by type hints: this tells MLflow
    # not to wrap predict() for hint-based validation (nor to advise adding hints).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        with open(context.artifacts[ARCHITECTURE_ARTIFACT]) as file:
            architecture = json.load(file)
        self.network = build_model(architecture)
        self.network.load_state_dict(load_file(context.artifacts[WEIGHTS_ARTIFACT]))
        self.network.eval()

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        try:
            pixels = decode_images(model_input)
        except InvalidPixels as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        probabilities = self.probabilities(pixels)
        return pd.DataFrame(
            {
                "digit": probabilities.argmax(axis=1),
                "probabilities": probabilities.tolist(),
            }
        )

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.network(normalize_pixels(torch.from_numpy(pixels)))
            return torch.softmax(logits, dim=1).numpy().astype(np.float64)
