"""The served model: raw pixels in, a digit and ten probabilities out.

MLflow builds it from `model_code.py` (models-from-code): the architecture is JSON, the
weights are safetensors, and this package travels with the model as code, so nothing is
unpickled when it loads. Preprocessing lives here, so clients never see the
normalization constants.

Accepted inputs, per image (all with `{"inputs": [...]}` or `{"instances": [...]}`):
- 784 numbers, or 28 rows of 28 numbers, each 0..255 (plain JSON arrays; JSON numbers
  only: strings and booleans are refused, but for a boolean among numbers, which MLflow's
  parsing has made a number before the model sees it);
- a base64 string of the 784 raw uint8 pixels, row-major (compact: ~4x smaller, fast);
- a base64 string of a PNG or JPEG file (any size within the caps below; grayscale-
  converted and resized to 28x28). Files are told apart by their signature, not their
  length, so a 784-byte PNG is read as a PNG.
And as a table (a CSV body, `dataframe_split`, `dataframe_records`): one row per image,
784 numeric columns in row-major pixel order, whatever their names (`pixel0..pixel783`
is the documented header); or one column of base64 strings or of pixel arrays.

The input is untrusted, so every request's work is bounded before anything is decoded:
at most MAX_IMAGES images, of which at most MAX_IMAGE_FILES PNG/JPEG files, each at most
MAX_IMAGE_BYTES and declaring at most MAX_IMAGE_PIXELS (read from its header before its
pixels are decoded). Every refusal is an `InvalidPixels` with a short message that quotes
no input; the served model turns it into HTTP 400 (`RefusedInput`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import stat
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

from mnist_track.errors import MnistTrackError
from mnist_track.models import IMAGE_SIDE, build_model
from mnist_track.pixels import normalize_pixels

WEIGHTS_ARTIFACT = "weights"
ARCHITECTURE_ARTIFACT = "architecture"
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
# The documented header of a pixel table (CSV, `dataframe_split`); any 784 names are read
# the same, by position.
PIXEL_COLUMNS = tuple(f"pixel{index}" for index in range(N_PIXELS))

# The caps on one request (README, "Serving the model"; benchmarks/serving.py measures the
# worst request they allow). Raw pixels cost microseconds an image; a PNG/JPEG file up to
# ~25 ms (its chunks, header and pixels are parsed), so files have a count of their own.
MAX_IMAGES = 1_000  # images per request, any format: up to ~3 MB of JSON numbers
MAX_IMAGE_FILES = 16  # PNG/JPEG files per request: ~0.4 s of decoding at most
MAX_IMAGE_BYTES = 64 * 1024  # per file: a digit's scan or crop is a few KB
MAX_IMAGE_PIXELS = 1024 * 1024  # declared width x height: <= ~5 MB and ~25 ms to decode
MAX_JPEG_SCANS = 64  # progressive JPEGs use ~10; each extra scan re-walks every pixel
MAX_MESSAGE = 300  # characters in a refusal: says what is wrong, never quotes the input

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
JPEG_START_OF_SCAN = b"\xff\xda"  # never inside entropy-coded data (0xFF is stuffed there)
MAX_BASE64_CHARS = 4 * -(-MAX_IMAGE_BYTES // 3)

_logger = logging.getLogger(__name__)


class InvalidPixels(MnistTrackError, ValueError):
    """A request's images cannot be read; the message says which and why."""


class RefusedInput(MlflowException):
    """A bad request as MLflow's scoring server answers it: HTTP 400 with our message only.

    The scoring server rewrites the message of any MlflowException raised by predict to
    "Failed to predict data '<the whole input>'. Error: ...", which echoes megabytes back
    to the client; any other exception becomes a 400 carrying the Python traceback. So
    this exception's message is set once, when it is made, and later assignments are
    ignored."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(_short(message), error_code=error_code)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def _short(text: str) -> str:
    text = " ".join(str(text).split())  # one line
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def model_signature() -> ModelSignature:
    """Outputs only. MLflow cannot express "784 or 28x28 numbers, a base64 string, or a
    784-column table" in an input schema, and every schema it has breaks one of them: a
    tensor schema refuses CSV bodies (it has no pandas types) and tables of more than one
    column; a column schema keeps only its own columns of a table, and of a JSON list,
    which pyfunc makes a table first. `AnyType`, under which MLflow's parsing leaves a
    JSON list as it is, is such a column type, and has no pandas type for CSV bodies
    either (tests/test_serving_parsing.py). Without a schema, MLflow hands the model what
    it parsed (numpy arrays from JSON lists, DataFrames from CSV and `dataframe_*`) and
    `decode_images` checks shape, type and range itself. The price, MLflow's and not the
    model's (README, "Beyond loopback"): a JSON list becomes one numpy array before the
    model sees it, so a list of strings takes 4 bytes per character of the longest times
    their count (up to about a quarter of the body's size squared), a `true` among
    numbers arrives as 1, and ragged or mixed lists get MLflow's own 400. `mnist-track
    serve` refuses those before MLflow parses them (`serving_guard.py`)."""
    return ModelSignature(
        outputs=Schema([ColSpec("long", "digit"), ColSpec(Array("double"), "probabilities")]),
    )


def decode_images(model_input) -> np.ndarray:
    """Any accepted input -> uint8-valued float32 pixels (N, 784). Raises InvalidPixels.

    Counts are checked first, then every string's length, base64 and signature, and only
    then are files decoded, one at a time."""
    if isinstance(model_input, pd.DataFrame):
        return _decode_table(model_input)
    if isinstance(model_input, dict):
        names = [name[:20] for name in sorted(map(str, model_input))[:5]]  # quote little
        raise InvalidPixels(
            f'expected a list of images, got named fields {names}; send {{"inputs": [image, ...]}}'
        )
    is_list = isinstance(model_input, (list, tuple))
    if not (is_list or isinstance(model_input, np.ndarray) and model_input.ndim > 0):
        raise InvalidPixels("expected a non-empty list of images")
    if len(model_input) == 0:
        raise InvalidPixels("expected a non-empty list of images")
    if len(model_input) > MAX_IMAGES:
        raise InvalidPixels(f"at most {MAX_IMAGES:,} images per request, got {len(model_input):,}")
    if is_list or model_input.ndim == 1:
        # numpy's own str_/bytes_ too: MLflow parses a JSON list of strings into them.
        texts = [issubclass(kind, (str, bytes)) for kind in {type(item) for item in model_input}]
        if all(texts):
            return _decode_strings(model_input)
        if any(texts):
            raise InvalidPixels(
                "images must be all base64 strings or all arrays of numbers, not a mix"
            )
    return _check_pixels(_numbers(model_input))


def _decode_table(table: pd.DataFrame) -> np.ndarray:
    """A DataFrame (a CSV body, `dataframe_split`, `dataframe_records`): one row per image,
    either 784 pixel columns (any names, in row-major order) or one column of images."""
    rows, columns = table.shape
    if columns == 1 and not pd.api.types.is_numeric_dtype(table.dtypes.iloc[0]):
        return decode_images(table.iloc[:, 0].to_numpy())  # base64 strings or pixel arrays
    if rows == 0:
        raise InvalidPixels("expected a non-empty table of images (one row per image)")
    if rows > MAX_IMAGES:
        raise InvalidPixels(f"at most {MAX_IMAGES:,} images per request, got {rows:,} rows")
    if columns != N_PIXELS:
        hint = "; is the first an index? write the CSV without it" if columns == 785 else ""
        raise InvalidPixels(
            f"a table of pixels needs {N_PIXELS} columns, one per pixel in row-major order "
            f"(e.g. pixel0..pixel783), got {columns:,}{hint}"
        )
    missing = table.isna().to_numpy()
    if missing.any():
        image, pixel = np.argwhere(missing)[0]
        raise InvalidPixels(
            f"pixel values must be numbers in 0..255; image {image}, pixel {pixel} is missing "
            f"({int(missing.sum())} missing values in all)"
        )
    return _check_pixels(_numbers(table.to_numpy()))


def _numbers(values) -> np.ndarray:
    """Pixel values as an array, each a real number: strings, booleans, None and nested
    lists of different lengths are refused, not converted."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        if values.dtype.kind == "b" and values.size:  # every value is a boolean
            where = "image 0, pixel 0" if values.ndim > 1 else "value 0"
            raise InvalidPixels(
                f"pixel values must be numbers 0..255; {where} is {_kind_of(values.flat[0])}"
            )
        if values.dtype.kind in "US":
            # MLflow turned the JSON list into strings, numbers among them: which value was
            # sent as a string is lost, so none is named.
            raise InvalidPixels('pixel values must be numbers 0..255, not strings (7, not "7")')
        if values.dtype.kind not in "iuf":
            raise InvalidPixels(f"pixel values must be numbers 0..255, got {values.dtype} values")
        return values
    if not isinstance(values, np.ndarray) or (
        values.ndim == 1 and any(isinstance(item, (list, tuple, np.ndarray)) for item in values)
    ):
        # Python lists, or MLflow's 1-D object array of per-image lists: nest them again.
        values = np.array(list(values), dtype=object)
    if values.size > MAX_IMAGES * N_PIXELS:
        raise InvalidPixels(f"at most {MAX_IMAGES:,} images of 784 values per request")
    if values.ndim > 3:
        raise _shape_error(values)
    kinds = set(map(type, values.reshape(-1)))
    if kinds & {list, tuple, np.ndarray}:
        raise InvalidPixels(
            "images must all have the same shape: 784 values or 28 rows of 28 values each"
        )
    if not all(_is_number_type(kind) for kind in kinds):
        flat = values.reshape(-1)
        index = _first_non_number(flat)
        image, pixel = divmod(index, values[0].size if values.ndim > 1 else len(flat))
        where = f"image {image}, pixel {pixel}" if values.ndim > 1 else f"value {index}"
        raise InvalidPixels(
            f"pixel values must be numbers 0..255; {where} is {_kind_of(flat[index])}"
        )
    return values


def _first_non_number(flat: np.ndarray) -> int:
    """The value to name in a refusal: the first that is no number even as text (a CSV
    column with one word in it is read as text, its numbers too), else the first that is
    not a number."""
    others = [index for index, value in enumerate(flat) if not _is_number_type(type(value))]
    return next((index for index in others if not _is_numeric_text(flat[index])), others[0])


def _is_numeric_text(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _is_number_type(kind: type) -> bool:
    # bool is an int subclass and np.bool_ is no number: both are refused.
    return kind in (int, float) or (
        issubclass(kind, (np.integer, np.floating)) and not issubclass(kind, np.bool_)
    )


def _kind_of(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return f"the boolean {bool(value)}"
    if isinstance(value, str):
        return "a string" if len(value) > 20 else f"the string {value!r}"
    return "null" if value is None else f"a {type(value).__name__}"


def _shape_error(array: np.ndarray) -> InvalidPixels:
    shape = f"of shape {tuple(array.shape)}" if array.ndim <= 4 else f"of {array.ndim} dimensions"
    return InvalidPixels(
        f"each image must be 784 values or 28 rows of 28 values; got an array {shape}"
    )


def _check_pixels(array: np.ndarray) -> np.ndarray:
    if array.ndim == 1 and array.shape[0] == N_PIXELS or array.shape == (IMAGE_SIDE, IMAGE_SIDE):
        array = array[np.newaxis]  # a single image sent without the batch list
    if not (
        array.ndim == 2
        and array.shape[1] == N_PIXELS
        or array.ndim == 3
        and array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE)
    ):
        raise _shape_error(array)
    if len(array) > MAX_IMAGES:
        raise InvalidPixels(f"at most {MAX_IMAGES:,} images per request, got {len(array):,}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # too large: inf, refused below
            array = array.reshape(len(array), N_PIXELS).astype(np.float32, copy=False)
    except (OverflowError, ValueError, TypeError):
        raise InvalidPixels("pixel values must be numbers in 0..255") from None
    bad = ~np.isfinite(array) | (array < 0) | (array > 255)
    if bad.any():
        image, pixel = np.argwhere(bad)[0]
        raise InvalidPixels(
            f"pixel values must be numbers in 0..255; image {image}, pixel {pixel} is "
            f"{array[image, pixel]!r} ({int(bad.sum())} bad values in all)"
        )
    return array


def _decode_strings(items) -> np.ndarray:
    """base64 strings -> pixels: every string is length-checked, decoded and sorted into
    raw pixels or a PNG/JPEG file before any file is decoded."""
    contents = [_from_base64(item, index) for index, item in enumerate(items)]
    files = [index for index, content in enumerate(contents) if image_format(content)]
    if len(files) > MAX_IMAGE_FILES:
        raise InvalidPixels(
            f"at most {MAX_IMAGE_FILES} PNG/JPEG images per request, got {len(files)}; "
            "send larger batches as raw pixels"
        )
    for index, content in enumerate(contents):
        if len(content) != N_PIXELS and image_format(content) is None:
            raise InvalidPixels(
                f"image {index}: {len(content):,} bytes that are neither 784 raw pixels nor "
                "a PNG/JPEG file"
            )
    pixels = np.empty((len(contents), N_PIXELS), dtype=np.float32)
    for index, content in enumerate(contents):
        if image_format(content):
            pixels[index] = image_file_to_pixels(content, f"image {index}")
        else:
            pixels[index] = np.frombuffer(content, dtype=np.uint8)
    return pixels


def _from_base64(item: str | bytes, index: int) -> bytes:
    if len(item) > MAX_BASE64_CHARS:
        raise InvalidPixels(
            f"image {index}: {len(item):,} base64 characters; at most {MAX_IMAGE_BYTES:,} "
            f"bytes ({MAX_BASE64_CHARS:,} characters) per image"
        )
    try:
        content = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidPixels(
            f"image {index}: a string must be base64 (raw pixels or PNG/JPEG)"
        ) from None
    if len(content) > MAX_IMAGE_BYTES:
        raise InvalidPixels(
            f"image {index}: {len(content):,} bytes; at most {MAX_IMAGE_BYTES:,} per image"
        )
    return content


def image_format(content: bytes) -> str | None:
    """ "PNG" or "JPEG" by the file's signature, else None."""
    if content.startswith(PNG_SIGNATURE):
        return "PNG"
    if content.startswith(JPEG_SIGNATURE):
        return "JPEG"
    return None


def image_file_to_pixels(content: bytes, label: str) -> np.ndarray:
    """PNG/JPEG bytes -> float32 pixels (784,), white digit on black as in MNIST: a picture
    with a light background (a dark digit on paper) is inverted. Raises InvalidPixels for
    any other format, a file over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS, or one Pillow
    cannot read."""
    kind = image_format(content)
    if kind is None:
        raise InvalidPixels(f"{label}: not a PNG or JPEG file ({len(content):,} bytes)")
    if len(content) > MAX_IMAGE_BYTES:
        raise InvalidPixels(
            f"{label}: {len(content):,} bytes; at most {MAX_IMAGE_BYTES:,} per image"
        )
    if kind == "JPEG" and content.count(JPEG_START_OF_SCAN) > MAX_JPEG_SCANS:
        raise InvalidPixels(f"{label}: a JPEG with more than {MAX_JPEG_SCANS} scans")
    try:
        pixels = _decode_file(content, kind, label)
    except InvalidPixels:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises many types on hostile bytes
        raise InvalidPixels(f"{label}: {_reason(error, kind)}") from None
    border = np.concatenate([pixels[:IMAGE_SIDE], pixels[-IMAGE_SIDE:]])
    return 255.0 - pixels if border.mean() > 127 else pixels


def _decode_file(content: bytes, kind: str, label: str) -> np.ndarray:
    from PIL import Image

    # Image.open reads the header only; the pixels are decoded by convert().
    with Image.open(io.BytesIO(content), formats=[kind]) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidPixels(
                f"{label}: {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} per image "
                f"(e.g. 1024x1024)"
            )
        gray = image.convert("L")
    if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
        gray = gray.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.float32).reshape(N_PIXELS)


def _reason(error: Exception, kind: str) -> str:
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):
        # Pillow's own check in Image.open, for sizes far beyond ours: same refusal.
        return f"declares far more than the {MAX_IMAGE_PIXELS:,} pixels allowed per image"
    return f"not a readable {kind} image ({_short(str(error) or type(error).__name__)[:100]})"


def open_regular_file(path: str | os.PathLike) -> io.BufferedReader:
    """A regular file opened for binary reading, for `predict`. A FIFO, a device
    (/dev/zero) or a folder is refused before it is read: the file is checked by name,
    then opened without blocking and checked again on the descriptor (it may have been
    swapped in between). Raises InvalidPixels."""
    label = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InvalidPixels(f"{label}: not a regular file")
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise InvalidPixels(f"{label}: {error.strerror or error}") from None
    file = open(descriptor, "rb", closefd=True)  # noqa: SIM115 - the caller closes it
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        file.close()
        raise InvalidPixels(f"{label}: not a regular file")
    return file


def read_image_file(path: str | os.PathLike) -> bytes:
    """An image file's bytes for `predict`: a regular file (`open_regular_file`) of at
    most MAX_IMAGE_BYTES, of which at most MAX_IMAGE_BYTES + 1 bytes are read."""
    with open_regular_file(path) as file:
        try:
            content = file.read(MAX_IMAGE_BYTES + 1)
        except OSError as error:
            raise InvalidPixels(f"{path}: {error.strerror or error}") from None
    if len(content) > MAX_IMAGE_BYTES:
        raise InvalidPixels(f"{path}: larger than {MAX_IMAGE_BYTES:,} bytes")
    return content


class DigitClassifier(PythonModel):
    """pyfunc model: preprocessing + network + softmax."""

    # The input formats are checked by decode_images, not by type hints: this tells MLflow
    # not to wrap predict() for hint-based validation (nor to advise adding hints).
    _skip_type_hint_validation = True

    @classmethod
    def from_data_files(cls, artifacts: Mapping[str, str | os.PathLike]) -> DigitClassifier:
        """The classifier built from its two data files alone (by artifact name, as
        MLflow's context names them), without MLflow loading the model around them."""
        classifier = cls()
        paths = {name: str(path) for name, path in artifacts.items()}
        classifier.load_context(SimpleNamespace(artifacts=paths))
        return classifier

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
            raise RefusedInput(str(error)) from None
        except Exception as error:
            # A bug, not a bad request: its traceback goes to the server's log, not to the
            # client (MLflow would send it as a "stack_trace" field).
            _logger.exception("reading a request's images failed")
            raise RefusedInput(
                f"internal error while reading the images ({type(error).__name__})",
                error_code=INTERNAL_ERROR,
            ) from None
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
