"""A guard in front of MLflow's scoring app (`mnist-track serve`): it checks a POST to
/invocations before MLflow parses it, and passes every other request through untouched.

MLflow's scoring server reads the whole body, then makes a JSON list one numpy array: a
list of strings becomes as wide as its longest string (4 bytes a character) times their
count, so a 70 KB body can take 1.2 GB before the model's caps can refuse it (README,
"Beyond loopback"). No input schema avoids that without breaking a format, so the guard
answers such requests itself, cheaply and in MLflow's error shape:

- 413 for a body over MAX_BODY_BYTES, read incrementally and never buffered past it;
- 415 for anything but JSON and CSV (Parquet is compressed: a small body can decode to
  gigabytes, and the model documents no Parquet input);
- 400 for a body with more values than the caps allow (commas counted, before parsing),
  and for JSON that is malformed, nested too deeply, or whose `inputs`/`instances` would
  parse into a numpy array over MAX_PARSED_BYTES, mixes lists with single values or
  strings, has rows of different lengths, or has `true`/`false` among numbers.

Everything it lets through is replayed byte for byte to MLflow's app, which parses it
again: the guard never changes what the model sees, only what reaches it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from mnist_track.serving import MAX_IMAGES, MAX_MESSAGE, N_PIXELS

# 1,000 images of 784 values at up to 20 bytes a value: a float's repr and its separator,
# or a record's `"pixel783": 255, ` in dataframe_records (JSON numbers take ~4 MB).
MAX_BODY_BYTES = 16 * 1024 * 1024
# Values in a body, counted by their commas: a table's header (or dataframe_split's
# columns) and MAX_IMAGES rows of N_PIXELS; base64 strings hold no commas.
MAX_VALUES = (MAX_IMAGES + 2) * N_PIXELS
MAX_CSV_LINES = MAX_IMAGES + 2  # a header, one row per image, a last newline
# What MLflow's numpy array of one request's strings may take: 1,000 raw images (4.0 MiB)
# or 16 files at the 64 KiB cap (5.3 MiB) fit; 16 such files beside 984 raw images
# (333 MiB), or 199 short strings beside one of 20,000 characters (15 MiB), do not.
MAX_PARSED_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 8  # an image is at most 28 rows of 28 values: 3 lists deep, 4 in a record
INLINE_CHECK_BYTES = 64 * 1024  # larger bodies are checked off the event loop
# numpy's width, in characters, of a number among strings ('<U21' int, '<U32' float).
NUMBER_AS_TEXT = 32

JSON_TYPE = "application/json"
CSV_TYPE = "text/csv"


class Refusal(Exception):
    """A request the guard answers itself: HTTP status, MLflow error code, message."""

    def __init__(self, status: int, message: str, error_code: str = "BAD_REQUEST") -> None:
        super().__init__(message[:MAX_MESSAGE])
        self.status = status
        self.error_code = error_code

    def payload(self) -> bytes:
        return json.dumps({"error_code": self.error_code, "message": str(self)}).encode()


class _ClientGone(Exception):
    """The client disconnected before its body was read."""


def check_body(body: bytes, content_type: str) -> None:
    """Raises Refusal for a body MLflow should not parse; returns for one it may."""
    mime = content_type.split(";")[0].strip().lower()
    if mime not in (JSON_TYPE, CSV_TYPE):
        raise Refusal(415, f"send {JSON_TYPE} or {CSV_TYPE} (got {content_type[:40]!r})")
    if body.count(b",") > MAX_VALUES:
        raise Refusal(400, f"at most {MAX_IMAGES:,} images of {N_PIXELS} values per request")
    if mime == CSV_TYPE:
        if body.count(b"\n") > MAX_CSV_LINES:
            raise Refusal(400, f"at most {MAX_IMAGES:,} rows (one per image) and a header")
        return
    check_json(body)


def check_json(body: bytes) -> None:
    try:
        document = json.loads(body)
    except RecursionError:
        raise Refusal(400, "the body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise Refusal(400, f"the body is not valid JSON: {error.msg} ({where})") from None
    except ValueError:  # not UTF-8, or an integer of more than 4,300 digits
        raise Refusal(400, "the body is not valid JSON (UTF-8 text of JSON values)") from None
    if isinstance(document, dict):
        for key in ("inputs", "instances"):
            if key in document:
                check_inputs(document[key])


@dataclass
class _Tally:
    values: int = 0
    longest: int = 0  # characters of the longest string
    strings: bool = False
    numbers: bool = False


def check_inputs(value) -> None:
    """`inputs`/`instances` as json.loads made it: raises Refusal where MLflow's numpy
    array of it would be too large or numpy would refuse it with its own message."""
    tally = _Tally()
    _walk(value, (), 0, tally)
    if not tally.strings:
        return  # numbers only: 8 bytes each, bounded by MAX_VALUES
    width = max(tally.longest, NUMBER_AS_TEXT if tally.numbers else 0)
    parsed = tally.values * width * 4
    if parsed > MAX_PARSED_BYTES:
        raise Refusal(
            400,
            f"{tally.values:,} values, the longest a string of {tally.longest:,} characters, "
            f"would take {parsed / 2**20:,.0f} MiB once parsed (MLflow pads every string to "
            f"the longest; at most {MAX_PARSED_BYTES // 2**20} MiB): send large PNG/JPEG "
            "files in requests of their own, or fewer images at once",
        )


def _walk(value, path: tuple[int, ...], depth: int, tally: _Tally) -> None:
    if depth > MAX_DEPTH:
        raise Refusal(400, f"inputs nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for item in value.values():
            _walk(item, path, depth + 1, tally)
        return
    if not isinstance(value, list):
        _tally_values([value], path, tally)
        return
    kinds = set(map(type, value))
    nested = kinds & {list, dict}
    if not nested:
        _tally_values(value, path, tally)
        return
    if kinds - nested:
        if str in kinds:
            raise Refusal(
                400, "images must be all base64 strings or all arrays of numbers, not a mix"
            )
        raise Refusal(400, f"lists and single values mixed{_at(path)}; {_SAME_SHAPE}")
    if kinds == {list}:
        lengths = sorted(set(map(len, value)))
        if len(lengths) > 1:
            raise Refusal(
                400, f"lists of {lengths[0]} and {lengths[-1]} values{_at(path)}; {_SAME_SHAPE}"
            )
    for index, item in enumerate(value):
        _walk(item, (*path, index), depth + 1, tally)


_SAME_SHAPE = "images must all have the same shape: 784 values or 28 rows of 28 values each"


def _tally_values(values: list, path: tuple[int, ...], tally: _Tally) -> None:
    tally.values += len(values)
    kinds = set(map(type, values))
    if str in kinds:
        tally.strings = True
        tally.longest = max(tally.longest, max(len(v) for v in values if type(v) is str))
    if kinds & {int, float}:
        tally.numbers = True
        if bool in kinds:  # MLflow's numpy array would make it 1 or 0
            index = next(i for i, v in enumerate(values) if type(v) is bool)
            where = _where((*path, index))
            raise Refusal(
                400, f"pixel values must be numbers 0..255; {where} is the boolean {values[index]}"
            )


def _where(path: tuple[int, ...]) -> str:
    if len(path) == 1:
        return f"value {path[0]}"
    if len(path) == 2:
        return f"image {path[0]}, pixel {path[1]}"
    return "value [" + "][".join(map(str, path)) + "]"


def _at(path: tuple[int, ...]) -> str:
    return f" in image {path[0]}" if path else ""


class RequestGuard:
    """ASGI middleware: checks POST /invocations (check_body) and replays the body it read
    to `app`; every other request goes straight to `app`."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/invocations"
        ):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        try:
            body = await self._read_body(headers, receive)
            if len(body) > INLINE_CHECK_BYTES:
                await asyncio.to_thread(check_body, body, content_type)
            else:
                check_body(body, content_type)
        except Refusal as refusal:
            await _answer(send, refusal)
            return
        except _ClientGone:
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, headers: dict, receive) -> bytes:
        too_large = Refusal(
            413,
            f"the body is larger than {self.max_body_bytes:,} bytes; send at most "
            f"{MAX_IMAGES:,} images per request",
            "REQUEST_LIMIT_EXCEEDED",
        )
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large  # before a byte of it is read
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that hands over `body` whole once, then the client's own messages (a
    disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _answer(send, refusal: Refusal) -> None:
    payload = refusal.payload()
    headers = [(b"content-type", JSON_TYPE.encode()), (b"content-length", b"%d" % len(payload))]
    if refusal.status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is never read
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
