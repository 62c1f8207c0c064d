"""Unit tests for mnist_track.serving_guard: the guard around a fake inner ASGI app that
records what reached it (no server, no model)."""

from __future__ import annotations

import asyncio
import base64
import json
import tracemalloc

import pytest

from mnist_track.serving import MAX_IMAGE_BYTES, MAX_IMAGE_FILES, MAX_IMAGES, PIXEL_COLUMNS
from mnist_track.serving_guard import (
    MAX_BODY_BYTES,
    MAX_PARSED_BYTES,
    Refusal,
    RequestGuard,
    check_body,
)

RAW_IMAGE = base64.b64encode(bytes(784)).decode()
LARGEST_FILE = "A" * (4 * -(-MAX_IMAGE_BYTES // 3))  # a base64 file at the byte cap


class Inner:
    """An ASGI app that reads its whole body and answers 200 with it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def call(
    body: bytes,
    content_type: str = "application/json",
    *,
    chunk: int | None = None,
    method: str = "POST",
    path: str = "/invocations",
    content_length: bool = True,
) -> tuple[int, bytes, Inner, int]:
    """(status, response body, the inner app, how many body bytes the guard received)."""
    inner = Inner()
    headers = [(b"content-type", content_type.encode())]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    size = chunk or max(len(body), 1)
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [
        {"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1}
        for index, piece in enumerate(pieces)
    ]
    received = 0
    sent: list[dict] = []

    async def receive():
        nonlocal received
        if not messages:
            return {"type": "http.disconnect"}
        message = messages.pop(0)
        received += len(message["body"])
        return message

    async def send(message):
        sent.append(message)

    asyncio.run(RequestGuard(inner)(scope, receive, send))
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:]), inner, received


def refusal(body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    status, answer, inner, _ = call(body, content_type)
    assert inner.bodies == [], "a refused body must not reach MLflow"
    error = json.loads(answer)
    assert set(error) == {"error_code", "message"} and len(error["message"]) <= 300
    return status, error["message"]


def inputs(images, key: str = "inputs") -> bytes:
    return json.dumps({key: images}).encode()


# --- passed through untouched ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        inputs([[0] * 784] * 3),
        inputs([[[0] * 28] * 28]),
        inputs([RAW_IMAGE] * MAX_IMAGES),
        inputs([LARGEST_FILE] * MAX_IMAGE_FILES, key="instances"),
        inputs([[0.5] * 784]),
        json.dumps({"dataframe_split": {"columns": list(PIXEL_COLUMNS), "data": [[0] * 784]}}),
        json.dumps({"dataframe_records": [dict.fromkeys(PIXEL_COLUMNS, 0)]}),
        inputs([]),
        b'{"inputs": null}',
        b"[1, 2]",
    ],
    ids=lambda body: str(body[:30]),
)
def test_good_json_is_replayed_byte_for_byte(body):
    body = body.encode() if isinstance(body, str) else body
    status, answer, inner, _ = call(body, chunk=1000)
    assert (status, answer, inner.bodies) == (200, body, [body])


def test_csv_and_other_requests_pass_through():
    csv = (",".join(PIXEL_COLUMNS) + "\n" + ",".join(["0"] * 784) + "\n").encode()
    assert call(csv, "text/csv; charset=utf-8")[2].bodies == [csv]
    for method, path in (("GET", "/ping"), ("GET", "/version"), ("POST", "/other")):
        status, _, inner, _ = call(b"x" * 10, "application/parquet", method=method, path=path)
        assert (status, inner.paths) == (200, [path])


def test_largest_legitimate_bodies_fit_the_limits():
    """1,000 images as floats with a long repr, and as dataframe_records with the
    documented header, are under the body limit and accepted."""
    floats = inputs([[123.45678901234567] * 784] * MAX_IMAGES)
    records = json.dumps({"dataframe_records": [dict.fromkeys(PIXEL_COLUMNS, 255)] * MAX_IMAGES})
    for body in (floats, records.encode()):
        assert len(body) <= MAX_BODY_BYTES
        check_body(body, "application/json")


# --- refused before MLflow parses -----------------------------------------------------------


def test_mixed_length_strings_are_refused_in_bounded_memory():
    """The request tests/test_serving_parsing.py measures MLflow taking 16 MB for, and the
    caps' worst (350 MB in MLflow): refused, with little memory of the guard's own."""
    for images in (["AAAA"] * 199 + ["A" * 20_000], [LARGEST_FILE] * 16 + [RAW_IMAGE] * 984):
        body = inputs(images)
        tracemalloc.start()
        try:
            status, message = refusal(body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert status == 400 and "MLflow pads every string to the longest" in message
        assert peak < 4 * len(body) + 1024 * 1024


def test_string_bound_counts_records_and_numbers_among_strings():
    records = [{"image": "A"}] * 999 + [{"image": "A" * 20_000}]
    assert refusal(inputs(records, key="instances"))[0] == 400
    numbers = [["1"] + [0] * 783] * MAX_IMAGES  # numpy makes every number a 32-wide string
    assert MAX_IMAGES * 784 * 32 * 4 > MAX_PARSED_BYTES
    assert refusal(inputs(numbers))[0] == 400


def test_oversized_body_is_refused_before_it_is_read():
    body = b" " * (MAX_BODY_BYTES + 1)
    status, answer, inner, received = call(body, chunk=64 * 1024)
    assert (status, inner.bodies, received) == (413, [], 0)
    assert json.loads(answer)["error_code"] == "REQUEST_LIMIT_EXCEEDED"


def test_oversized_chunked_body_is_read_only_up_to_the_limit():
    body = b" " * (2 * MAX_BODY_BYTES)
    status, _, inner, received = call(body, chunk=64 * 1024, content_length=False)
    assert (status, inner.bodies) == (413, [])
    assert received <= MAX_BODY_BYTES + 64 * 1024


@pytest.mark.parametrize(
    "body, fragment",
    [
        (inputs([[0, True] + [0] * 782]), "image 0, pixel 1 is the boolean True"),
        (inputs([0, False] + [0] * 782), "value 1 is the boolean False"),
        (inputs([[0] * 784, [0] * 783]), "lists of 783 and 784 values"),
        (inputs([[0] * 784, RAW_IMAGE]), "not a mix"),
        (inputs([[0] * 784, 7]), "lists and single values mixed"),
        (b'{"inputs": ' + b"[" * 50 + b"0" + b"]" * 50 + b"}", "nested more than 8 levels"),
        (b'{"inputs": ' + b"[" * 5000 + b"0" + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"inputs": [' + b"1," * (1 << 19), "not valid JSON: Expecting value"),
        (b'{"inputs": [' + b"0," * (MAX_IMAGES + 3) * 784 + b"0]}", "at most 1,000 images"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
    ids=[
        "boolean-among-numbers",
        "boolean-in-one-image",
        "ragged",
        "strings-and-arrays",
        "lists-and-numbers",
        "nested-50",
        "nested-5000",
        "1MiB-malformed",
        "too-many-values",
        "not-utf8",
    ],
)
def test_bad_json_gets_400_and_a_short_message(body, fragment):
    status, message = refusal(body)
    assert status == 400 and fragment in message, message
    assert "1,1,1" not in message  # nothing of the body quoted back


def test_parquet_and_unknown_types_are_refused_and_too_many_csv_rows():
    assert refusal(b"PAR1", "application/parquet")[0] == 415
    assert refusal(b"{}", "text/plain")[0] == 415
    rows = b"a\n" + b"0\n" * (MAX_IMAGES + 10)
    assert refusal(rows, "text/csv") == (400, "at most 1,000 rows (one per image) and a header")


def test_refusal_message_is_capped():
    assert len(str(Refusal(400, "x" * 1000))) == 300
