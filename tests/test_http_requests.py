"""benchmarks/http_requests.py counts what the team benchmark reports as a trial's HTTP
requests: every request of the block, from any thread, grouped by endpoint with ids and
artifact paths folded; nothing counted outside the block."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from benchmarks.http_requests import counting_requests, endpoint_of  # noqa: E402

RUN_ID = "0123456789abcdef0123456789abcdef"
MODEL_ID = "m-" + "f" * 32


class _Ok(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_ids_and_artifact_paths_are_folded():
    assert endpoint_of(f"http://h:1/api/2.0/mlflow/runs/get?run_id={RUN_ID}") == (
        "/api/2.0/mlflow/runs/get"
    )
    assert endpoint_of(f"http://h:1/api/2.0/mlflow/logged-models/{MODEL_ID}") == (
        "/api/2.0/mlflow/logged-models/<id>"
    )
    artifact = f"http://h:1/api/2.0/mlflow-artifacts/artifacts/1/{RUN_ID}/artifacts/plots/a.png"
    assert endpoint_of(artifact) == "/api/2.0/mlflow-artifacts/artifacts/..."


def test_every_request_of_the_block_is_counted_from_any_thread(server_url):
    session = requests.Session()
    session.get(f"{server_url}/before")  # not counted
    with counting_requests() as log:
        session.post(f"{server_url}/api/2.0/mlflow/runs/create", json={})
        uploads = [
            threading.Thread(
                target=requests.put,
                args=(f"{server_url}/api/2.0/mlflow-artifacts/artifacts/1/{RUN_ID}/f{i}",),
                kwargs={"data": b"x"},
                name=f"upload-{i}",
            )
            for i in range(3)
        ]
        for upload in uploads:
            upload.start()
        for upload in uploads:
            upload.join()
    session.get(f"{server_url}/after")  # not counted either
    assert len(log.requests) == 4
    assert log.by_endpoint() == {
        "POST /api/2.0/mlflow/runs/create": 1,
        "PUT /api/2.0/mlflow-artifacts/artifacts/...": 3,
    }
    assert {r.thread for r in log.requests} == {"MainThread", "upload-0", "upload-1", "upload-2"}
    assert all(r.milliseconds > 0 for r in log.requests)
    assert log.summary().startswith("3 PUT /api/2.0/mlflow-artifacts/artifacts/..., 1 POST")
