"""Tables of pixels for the served model (mnist_track.serving): a CSV body,
`dataframe_split` and `dataframe_records`, parsed by MLflow's own scoring-server functions
under the model's signature, then decoded and checked by `decode_images`."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc.scoring_server import _parse_json_data, parse_csv_input

from mnist_track.serving import (
    MAX_IMAGES,
    MAX_MESSAGE,
    PIXEL_COLUMNS,
    InvalidPixels,
    decode_images,
    model_signature,
)

SCHEMA = model_signature().inputs  # what the scoring server parses requests with


@pytest.fixture(scope="module")
def digits(raw_mnist) -> np.ndarray:
    """Five real test images as uint8 rows (5, 784)."""
    return raw_mnist.test_images[:5].reshape(5, 784)


def csv_body(rows, columns=PIXEL_COLUMNS) -> str:
    lines = [",".join(map(str, columns))]
    lines += [",".join(map(str, row)) for row in rows]
    return "\n".join(lines) + "\n"


def from_csv(body: str):
    """A CSV body as the scoring server (and `mlflow models predict -t csv`) parses it."""
    return parse_csv_input(io.StringIO(body), schema=SCHEMA)


def from_json(request: dict):
    """A JSON body as the scoring server (and `mlflow models predict -t json`) parses it."""
    return _parse_json_data(json.dumps(request), Model(signature=model_signature()), SCHEMA).data


def split(rows, columns=PIXEL_COLUMNS) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": [list(row) for row in rows]}}


def records(rows, columns=PIXEL_COLUMNS) -> dict:
    return {"dataframe_records": [dict(zip(columns, row, strict=True)) for row in rows]}


def refusal(model_input) -> str:
    with pytest.raises(InvalidPixels) as caught:
        decode_images(model_input)
    message = str(caught.value)
    assert len(message) <= MAX_MESSAGE and "\n" not in message
    return message


# --- accepted tables ---------------------------------------------------------------------


def test_csv_with_the_documented_header(digits):
    table = from_csv(csv_body(digits.tolist()))
    assert isinstance(table, pd.DataFrame) and table.shape == (5, 784)
    np.testing.assert_array_equal(decode_images(table), digits.astype(np.float32))


def test_csv_columns_are_read_by_position_whatever_their_names(digits):
    reference = decode_images(from_csv(csv_body(digits.tolist())))
    for names in (range(784), [f"x{783 - i}" for i in range(784)]):
        decoded = decode_images(from_csv(csv_body(digits.tolist(), columns=names)))
        np.testing.assert_array_equal(decoded, reference)


def test_csv_float_pixels_in_range_are_kept(digits):
    rows = (digits / 2).tolist()
    np.testing.assert_allclose(decode_images(from_csv(csv_body(rows))), digits / 2, rtol=1e-6)


@pytest.mark.parametrize("form", [split, records], ids=["dataframe_split", "dataframe_records"])
def test_json_tables(digits, form):
    table = from_json(form(digits.tolist()))
    assert isinstance(table, pd.DataFrame) and table.shape == (5, 784)
    np.testing.assert_array_equal(decode_images(table), digits.astype(np.float32))


def test_a_table_of_one_column_of_base64_strings(digits):
    encoded = [base64.b64encode(row.astype(np.uint8).tobytes()).decode() for row in digits]
    for table in (
        from_csv("image\n" + "\n".join(encoded) + "\n"),
        from_json({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}),
    ):
        np.testing.assert_array_equal(decode_images(table), digits.astype(np.float32))


def test_json_lists_still_pass_through(digits):
    """Without an input schema, MLflow hands the model numpy arrays for `inputs` and
    `instances`: the formats of before still decode to the same pixels."""
    expected = digits.astype(np.float32)
    encoded = [base64.b64encode(row.astype(np.uint8).tobytes()).decode() for row in digits]
    for request in (
        {"inputs": digits.tolist()},
        {"inputs": digits.reshape(5, 28, 28).tolist()},
        {"instances": digits.tolist()},
        {"inputs": encoded},
        {"instances": encoded},
    ):
        np.testing.assert_array_equal(decode_images(from_json(request)), expected)


def test_the_most_rows_a_request_may_hold():
    table = from_csv(csv_body([[0] * 784] * MAX_IMAGES))
    assert decode_images(table).shape == (MAX_IMAGES, 784)


# --- refused tables ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "fragments"),
    [
        (783, ["784 columns", "pixel0..pixel783", "got 783"]),
        (785, ["got 785", "index"]),
        (2, ["got 2"]),
    ],
)
def test_wrong_column_count(columns, fragments):
    message = refusal(from_csv(csv_body([[0] * columns], columns=range(columns))))
    for fragment in fragments:
        assert fragment in message


def test_one_numeric_column_is_not_a_column_of_images():
    assert "got 1" in refusal(from_csv(csv_body([[5]] * 784, columns=["pixel0"])))


def test_strings_in_a_csv_name_the_image_and_pixel():
    rows = [[0] * 784, [0] * 700 + ["dark"] + [0] * 83]
    message = refusal(from_csv(csv_body(rows)))
    assert "image 1, pixel 700 is the string 'dark'" in message


def test_numbers_as_strings_in_json_records_are_refused():
    row = [0] * 784
    row[3] = "7"
    assert "pixel 3 is the string '7'" in refusal(from_json(records([row])))


def test_a_long_string_is_not_quoted():
    rows = [["x" * 5000] + [0] * 783]
    message = refusal(from_csv(csv_body(rows)))
    assert "image 0, pixel 0 is a string" in message and "xxx" not in message


def test_booleans_are_refused():
    row = [0] * 784
    row[9] = True
    assert "pixel 9 is the boolean True" in refusal(from_json(split([row])))
    assert "the boolean True" in refusal(from_csv(csv_body([[True] * 784])))


@pytest.mark.parametrize(
    ("value", "fragment"), [(256, "256"), (-1, "-1"), (1e9, "1e+09")], ids=["256", "-1", "1e9"]
)
def test_out_of_range(value, fragment):
    rows = [[0] * 784, [0] * 784]
    rows[1][42] = value
    for table in (from_csv(csv_body(rows)), from_json(split(rows))):
        message = refusal(table)
        assert "0..255" in message and "image 1, pixel 42" in message and fragment in message


def test_missing_cells_are_refused():
    body = csv_body([[0] * 784, [0] * 784]).replace("\n0,", "\n,", 1)  # image 0, pixel 0
    assert "image 0, pixel 0 is missing (1 missing values in all)" in refusal(from_csv(body))
    assert "is missing" in refusal(from_json(split([[None] * 784])))


def test_too_many_rows():
    table = from_csv(csv_body([[0] * 784] * (MAX_IMAGES + 1)))
    assert f"at most {MAX_IMAGES:,} images per request, got {MAX_IMAGES + 1:,}" in refusal(table)


def test_an_empty_table():
    assert "non-empty" in refusal(from_csv(",".join(PIXEL_COLUMNS) + "\n"))
    assert "non-empty" in refusal(pd.DataFrame())


# --- JSON lists as MLflow now parses them ---------------------------------------------------


def test_json_strings_and_booleans_among_pixels_are_refused():
    assert "not strings" in refusal(from_json({"inputs": [["7"] * 784]}))
    assert "not strings" in refusal(from_json({"inputs": [[0, "7"] + [0] * 782]}))
    assert "image 0, pixel 0 is the boolean True" in refusal(from_json({"inputs": [[True] * 784]}))


# --- random near-miss tables ----------------------------------------------------------------

cells = (
    st.integers(0, 255)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.none()
    | st.booleans()
)


@st.composite
def near_tables(draw) -> list[list]:
    """1-3 rows of 783-785 zeros with a few odd cells."""
    columns = draw(st.sampled_from([783, 784, 784, 785]))
    table = [[0] * columns for _ in range(draw(st.integers(1, 3)))]
    changes = st.tuples(st.integers(0, len(table) - 1), st.integers(0, columns - 1), cells)
    for row, column, value in draw(st.lists(changes, max_size=4)):
        table[row][column] = value
    return table


def parsed(table: list[list], form: str):
    columns = [f"c{index}" for index in range(len(table[0]))]
    if form == "csv":
        text = io.StringIO()
        csv.writer(text).writerows([columns, *table])
        return from_csv(text.getvalue())
    return from_json((split if form == "split" else records)(table, columns))


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(table=near_tables(), form=st.sampled_from(["csv", "split", "records"]))
def test_random_tables_are_pixels_or_a_short_refusal(table, form):
    try:
        model_input = parsed(table, form)
    except MlflowException:
        return  # refused by MLflow before the model, with its own 400
    try:
        pixels = decode_images(model_input)
    except InvalidPixels as error:
        assert 0 < len(str(error)) <= MAX_MESSAGE and "\n" not in str(error)
        return
    assert pixels.dtype == np.float32 and pixels.shape == (len(table), 784)
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 255
