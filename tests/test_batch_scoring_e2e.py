"""Batch scoring end to end, through the real parts, on 20 real test digits: `mlflow models
predict` on a CSV of 784 pixel columns and on its JSON forms, the served model (`mlflow
models serve`) over HTTP with CSV, `dataframe_split` and `dataframe_records` bodies, and
`mnist-track predict` on an IDX file and a folder into a CSV. The registered model and the
server are the fixtures of test_end_to_end.py (trained and started once for this module)."""

from __future__ import annotations

import gzip
import json
import signal
import struct
import subprocess
import time

import mlflow
import numpy as np
import pytest
import test_end_to_end as e2e
from conftest import BIN_DIR, cli_env, read_predictions, run_cli
from PIL import Image

from mnist_track.serving import PIXEL_COLUMNS

pytestmark = pytest.mark.e2e

store = e2e.store
server = e2e.server
CHAMPION = f"models:/{e2e.MODEL}@champion"
N_DIGITS = 20
RIGHT_AT_LEAST = 16  # of 20: two epochs on 3,000 images score about 90%


@pytest.fixture(scope="module")
def digits(raw_mnist):
    """(uint8 pixels (20, 784), labels) of the first 20 test images."""
    return raw_mnist.test_images[:N_DIGITS].reshape(N_DIGITS, 784), raw_mnist.test_labels[:N_DIGITS]


@pytest.fixture(scope="module")
def expected(store, digits) -> list[int]:
    """The champion's own digits for these images, from its `{"inputs": ...}` path."""
    from mnist_track.model_files import load_classifier

    mlflow.set_tracking_uri(store["uri"])
    found = load_classifier(CHAMPION).predict(None, digits[0].tolist())["digit"].tolist()
    assert sum(np.array(found) == digits[1]) >= RIGHT_AT_LEAST
    return found


def pixels_csv(pixels: np.ndarray) -> str:
    """The documented table: a header pixel0..pixel783, one row of integers per image."""
    lines = [",".join(PIXEL_COLUMNS), *(",".join(map(str, row)) for row in pixels)]
    return "\n".join(lines) + "\n"


def mlflow_models_predict(store, tmp_path, name: str, content: str, content_type: str):
    source, answer = tmp_path / name, tmp_path / f"{name}.predictions.json"
    source.write_text(content)
    result = subprocess.run(
        [
            *(str(BIN_DIR / "mlflow"), "models", "predict", "-m", CHAMPION),
            *("-i", str(source), "-t", content_type, "-o", str(answer), "--env-manager", "local"),
        ],
        env=cli_env(MLFLOW_TRACKING_URI=store["uri"]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(answer.read_text())["predictions"]


def digits_of(predictions) -> list[int]:
    for prediction in predictions:
        assert len(prediction["probabilities"]) == 10
        assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    return [prediction["digit"] for prediction in predictions]


# --- mlflow models predict -----------------------------------------------------------------


def test_mlflow_models_predict_reads_a_csv_of_pixels(store, digits, expected, tmp_path):
    predictions = mlflow_models_predict(store, tmp_path, "pixels.csv", pixels_csv(digits[0]), "csv")
    assert digits_of(predictions) == expected


@pytest.mark.parametrize("form", ["dataframe_split", "inputs"])
def test_mlflow_models_predict_reads_json(store, digits, expected, tmp_path, form):
    pixels = digits[0].tolist()
    request = (
        {"dataframe_split": {"columns": list(PIXEL_COLUMNS), "data": pixels}}
        if form == "dataframe_split"
        else {"inputs": pixels}
    )
    predictions = mlflow_models_predict(store, tmp_path, "pixels.json", json.dumps(request), "json")
    assert digits_of(predictions) == expected


# --- the served model over HTTP ---------------------------------------------------------


def test_served_model_reads_a_csv_body(server, digits, expected):
    status, body = e2e.post(server, pixels_csv(digits[0]), content_type="text/csv")
    assert status == 200, body
    assert digits_of(body["predictions"]) == expected


def test_served_model_reads_dataframe_split_and_records(server, digits, expected):
    pixels = digits[0].tolist()
    split = {"dataframe_split": {"columns": list(PIXEL_COLUMNS), "data": pixels}}
    records = {"dataframe_records": [dict(zip(PIXEL_COLUMNS, row, strict=True)) for row in pixels]}
    for request in (split, records):
        status, body = e2e.post(server, request)
        assert status == 200, body
        assert digits_of(body["predictions"]) == expected


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (
            {"dataframe_split": {"columns": list(PIXEL_COLUMNS[:783]), "data": [[0] * 783]}},
            "application/json",
            "a table of pixels needs 784 columns, one per pixel in row-major order",
        ),
        (
            {"dataframe_records": [dict(zip(PIXEL_COLUMNS, [0] * 783 + ["7"], strict=True))]},
            "application/json",
            "image 0, pixel 783 is the string '7'",
        ),
        (
            pixels_csv(np.full((2, 784), 256)),
            "text/csv",
            "image 0, pixel 0 is np.float32(256.0) (1568 bad values in all)",
        ),
        (
            pixels_csv([[0] * 784, [0] * 783 + ["dark"]]),
            "text/csv",
            "image 1, pixel 783 is the string 'dark'",
        ),
    ],
    ids=["783-columns", "string-in-records", "csv-out-of-range", "csv-word"],
)
def test_served_model_refuses_bad_tables_with_a_reason(server, body, content_type, message):
    status, answer = e2e.post(
        server, body if isinstance(body, str) else json.dumps(body), content_type=content_type
    )
    assert status == 400, answer
    assert message in answer["message"]
    assert len(answer["message"]) <= 300 and "Traceback" not in json.dumps(answer)


# --- mnist-track predict ----------------------------------------------------------------------


def test_predict_scores_an_idx_file_and_a_folder_into_a_csv(store, digits, expected, tmp_path):
    pixels, _ = digits
    idx = tmp_path / "digits-idx3-ubyte.gz"
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", N_DIGITS, 28, 28)  # IDX: N x 28 x 28
    idx.write_bytes(gzip.compress(header + pixels.tobytes()))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for index, image in enumerate(pixels.reshape(N_DIGITS, 28, 28)):
        Image.fromarray(image).save(folder / f"digit{index:02d}.png")
    output = tmp_path / "digits.csv"
    result = run_cli(
        "predict", "-m", CHAMPION, str(idx), str(folder), "--output", str(output),
        MLFLOW_TRACKING_URI=store["uri"],
    )  # fmt: skip
    assert result.stdout == "" and "Error" not in result.stderr
    rows = read_predictions(output.read_text())
    assert len(rows) == 2 * N_DIGITS
    assert [(row["source"], row["index"]) for row in rows[:N_DIGITS]] == [
        (str(idx), str(index)) for index in range(N_DIGITS)
    ]
    assert [row["source"] for row in rows[N_DIGITS:]] == [
        str(folder / f"digit{index:02d}.png") for index in range(N_DIGITS)
    ]
    assert [int(row["digit"]) for row in rows] == expected * 2
    for row in rows:
        assert sum(float(row[f"p{digit}"]) for digit in range(10)) == pytest.approx(1, abs=1e-4)


def test_predict_stopped_by_sigterm_leaves_no_partial_output(store, tmp_path):
    """SIGTERM (`kill`, a timeout, a scheduler) stops `predict -o` as Ctrl-C does: exit
    130, and neither the output nor its partial file beside it is left behind."""
    count = 100_000  # blank images: seconds of scoring, time enough to stop it midway
    idx = tmp_path / "blank-idx3-ubyte"
    idx.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", count, 28, 28) + bytes(count * 784))
    output = tmp_path / "blank.csv"
    partial = tmp_path / ".blank.csv.partial"
    process = subprocess.Popen(
        [str(BIN_DIR / "mnist-track"), "predict", "-m", CHAMPION, str(idx), "-o", str(output)],
        env=cli_env(MLFLOW_TRACKING_URI=store["uri"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert partial.exists(), "predict never started writing its output"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert not partial.exists() and not output.exists()
