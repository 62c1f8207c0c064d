"""`mnist-track serve` end to end: a real server process on a free loopback port, serving
the model test_end_to_end.py trains and registers, hit over HTTP. Good JSON and CSV
requests are classified as by `mlflow models serve`; the requests MLflow's own parsing
mishandles (strict xfails against `mlflow models serve` in test_bad_input_serving.py and
test_serving_parsing.py) get a quick, short 4xx from the guard here."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import test_end_to_end as e2e
from conftest import BIN_DIR, cli_env
from test_bad_input_serving import HTTP_CASES, SHORT_BODY, Request, post
from test_batch_scoring_e2e import pixels_csv

from mnist_track.serving_guard import MAX_BODY_BYTES

pytestmark = pytest.mark.e2e

store = e2e.store
N_DIGITS = 20
RIGHT_AT_LEAST = 16  # of 20: two epochs on 3,000 images score about 90%
# The requests `mlflow models serve` answers before the model runs (strict xfails there).
MLFLOW_CASES = {case.id: case.values[0] for case in HTTP_CASES if case.marks}
MODEL_COPY = "mnist-track-serve-*"  # the model's local copy, in the server's TMPDIR
GUARD_DOES_NOT_PARSE_CSV = pytest.mark.xfail(
    strict=True, reason="the guard passes CSV to MLflow unparsed: pandas' error reaches the client"
)


def start_serving(store, temp_folder: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`mnist-track serve models:/e2e-model@champion OPTIONS` on a free port, with
    TEMP_FOLDER as its TMPDIR, once it answers /ping: (process, URL)."""
    port = e2e.free_port()
    process = subprocess.Popen(
        [str(BIN_DIR / "mnist-track"), "serve", f"models:/{e2e.MODEL}@champion"]
        + ["--port", str(port), *options],
        env=cli_env(MLFLOW_TRACKING_URI=store["uri"], TMPDIR=str(temp_folder)),
        cwd=store["folder"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2).close()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"mnist-track serve did not answer /ping:\n{process.communicate()[0]}")


def stop_serving(process: subprocess.Popen, temp_folder: Path) -> None:
    """SIGTERM, as a service manager stops a server: it exits 0, and the model's local
    copy in TEMP_FOLDER goes with it."""
    copies = list(temp_folder.glob(MODEL_COPY))
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert len(copies) == 1, "the model's copy was not where the test looks"
    assert process.returncode == 0, output[-3000:]
    assert not list(temp_folder.glob(MODEL_COPY)), "the model's copy outlived the server"


@pytest.fixture(scope="module")
def guarded(store, tmp_path_factory):
    """`mnist-track serve models:/e2e-model@champion` on a free port; its URL."""
    temp_folder = tmp_path_factory.mktemp("serve-tmp")
    process, url = start_serving(store, temp_folder)
    yield url
    stop_serving(process, temp_folder)


@pytest.fixture(scope="module")
def digits(raw_mnist):
    return raw_mnist.test_images[:N_DIGITS].reshape(N_DIGITS, 784), raw_mnist.test_labels[:N_DIGITS]


def right(answer: bytes, labels) -> int:
    found = [row["digit"] for row in json.loads(answer)["predictions"]]
    assert len(found) == len(labels)
    return sum(int(a) == int(b) for a, b in zip(found, labels, strict=True))


def test_json_and_csv_requests_are_classified(guarded, digits):
    pixels, labels = digits
    status, answer = post(
        guarded, json.dumps({"inputs": pixels.tolist()}).encode(), "application/json"
    )
    assert status == 200 and right(answer, labels) >= RIGHT_AT_LEAST
    status, answer = post(guarded, pixels_csv(pixels).encode(), "text/csv")
    assert status == 200 and right(answer, labels) >= RIGHT_AT_LEAST


def test_mixed_length_strings_get_400_quickly(guarded):
    """10,000 empty strings and one of 30,000 characters: 1.2 GB in MLflow's parsing."""
    body = json.dumps({"inputs": [""] * 10_000 + ["A" * 30_000]}).encode()
    started = time.perf_counter()
    status, answer = post(guarded, body, "application/json")
    assert time.perf_counter() - started < 5
    assert status == 400 and "MLflow pads every string" in json.loads(answer)["message"]


def test_oversized_body_gets_413_before_it_is_sent(guarded):
    """Only the headers are sent: the answer comes without the body being read."""
    port = int(guarded.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
        )
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error_code"] == "REQUEST_LIMIT_EXCEEDED"


@pytest.mark.parametrize(
    "case_id",
    [
        pytest.param(case_id, marks=GUARD_DOES_NOT_PARSE_CSV if "csv" in case_id else ())
        for case_id in MLFLOW_CASES
    ],
)
def test_what_mlflow_answers_before_the_model_gets_a_short_4xx(guarded, case_id):
    case: Request = MLFLOW_CASES[case_id]
    status, body = post(guarded, case.body(), case.content_type)
    assert 400 <= status < 500, (status, body[:300])
    assert len(body) <= SHORT_BODY and b"Traceback" not in body, body[:300]
    assert case.fragment in json.loads(body)["message"]


def test_server_still_answers_afterwards(guarded, digits):
    pixels, labels = digits
    status, answer = post(
        guarded, json.dumps({"inputs": pixels[:2].tolist()}).encode(), "application/json"
    )
    assert status == 200 and len(json.loads(answer)["predictions"]) == 2
    urllib.request.urlopen(f"{guarded}/ping", timeout=5).close()


def test_several_workers_serve_and_all_stop_with_the_server(store, digits, tmp_path):
    """--workers 2: uvicorn starts two worker processes on the downloaded model, requests
    are answered (and refused) as with one, and a SIGTERM to the server stops them all."""
    import psutil

    pixels, labels = digits
    process, url = start_serving(store, tmp_path, "--workers", "2")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = [
                child
                for child in psutil.Process(process.pid).children(recursive=True)
                if "spawn_main" in " ".join(child.cmdline())  # not the resource tracker
            ]
            if len(workers) == 2:
                break
            time.sleep(0.5)
        assert len(workers) == 2, [child.cmdline() for child in workers]
        body = json.dumps({"inputs": pixels.tolist()}).encode()
        for _ in range(6):
            status, answer = post(url, body, "application/json")
            assert status == 200 and right(answer, labels) >= RIGHT_AT_LEAST
        status, _ = post(url, b'{"inputs": [[1, true]]}', "application/json")
        assert status == 400  # the guard is in every worker
    except BaseException:
        process.kill()
        raise
    stop_serving(process, tmp_path)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "a serving worker outlived the server"
