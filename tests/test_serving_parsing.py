"""What MLflow's scoring server does to a request before the model sees it, under the
model's signature (mnist_track.serving.model_signature): the price of having no input
schema, and why no schema MLflow has avoids it. Both are strict xfails: when MLflow
changes, the test says so (README, "Beyond loopback"). `mnist-track serve` refuses such a
list before MLflow parses it (tests/test_serving_guard.py, tests/test_serve_e2e.py)."""

from __future__ import annotations

import io
import json
import tracemalloc

import pytest
from mlflow.models import Model
from mlflow.models.utils import _enforce_schema
from mlflow.pyfunc.scoring_server import _parse_json_data, parse_csv_input
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from mnist_track.serving import PIXEL_COLUMNS, model_signature

# 199 short strings and one long one: MLflow's np.array makes every string as wide as the
# longest, 4 bytes a character: 200 x 20,000 x 4 = 16 MB for a 21 KB body.
HOSTILE_STRINGS = ["AAAA"] * 199 + ["A" * 20_000]
PARSING_BUDGET = 1024 * 1024  # bytes: the parsed strings themselves are ~25 KB


def parsing_peak(body: str) -> int:
    """Peak bytes allocated while the scoring server parses `body` under the signature."""
    model = Model(signature=model_signature())
    tracemalloc.start()
    try:
        _parse_json_data(body, model, model.signature.inputs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.xfail(
    strict=True,
    reason="without an input schema MLflow makes a JSON list one fixed-width numpy array",
)
@pytest.mark.parametrize("key", ["inputs", "instances"])
def test_mixed_length_strings_are_parsed_in_memory_like_their_body(key):
    body = json.dumps({key: HOSTILE_STRINGS})
    assert parsing_peak(body) < PARSING_BUDGET, f"{len(body):,}-byte body"


@pytest.mark.xfail(
    strict=True,
    reason="MLflow: a CSV body needs a pandas type for every column, and schema "
    "enforcement turns a JSON list into a table of the schema's columns only",
)
def test_an_any_input_schema_would_keep_csv_and_pixel_lists():
    """The schema that would hand JSON lists over raw, `ColSpec(AnyType())`, breaks two
    formats the model takes: CSV bodies and lists of 784 numbers."""
    schema = Schema([ColSpec(AnyType())])
    csv = ",".join(PIXEL_COLUMNS) + "\n" + ",".join(["0"] * len(PIXEL_COLUMNS)) + "\n"
    try:
        table = parse_csv_input(io.StringIO(csv), schema=schema)
    except Exception:  # noqa: BLE001 - the server answers 400, whatever the reason
        table = None
    images = _enforce_schema([[0] * len(PIXEL_COLUMNS)] * 2, schema)
    assert table is not None and table.shape == (1, len(PIXEL_COLUMNS))
    assert getattr(images, "shape", None) == (2, len(PIXEL_COLUMNS))
