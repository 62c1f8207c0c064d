"""A real `mlflow models serve` process over loopback HTTP: latency of single-image
requests and images/s of 256-image batches, for plain JSON arrays and for the compact
base64 format, with 1 and 4 concurrent clients (threads, one keep-alive connection each);
and the input caps under load: 20 concurrent requests of the worst input the caps allow
beside 20 of one small image, with the wall time and the server's peak RSS; and the same
against `mnist-track serve` (the same model behind mnist_track.serving_guard), which
refuses that request before MLflow parses it, with the largest mixed request it accepts."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from benchmarks.common import BIN_DIR, Context, Figure, log, percentile, temp_store, timed

NAME = "serving"
MODEL = "bench-serving"
BATCH = 256
START_TIMEOUT = 180
BURST = 20  # concurrent requests in the caps figures


def register_small_model(context: Context, store) -> None:
    """A classic MLP trained one epoch on 10,000 images, logged and registered (version 1)
    with the functions train_and_track uses (no plots: they do not change the model)."""
    from mnist_track import registry, tracking
    from mnist_track.config import TrainConfig
    from mnist_track.models import architecture_of
    from mnist_track.pixels import to_pixels
    from mnist_track.train import fit

    config = TrainConfig(epochs=1, train_limit=10_000)
    splits = context.splits(train_limit=10_000, test_limit=1000)
    result = fit(config, splits)
    tracking.use_tracking_uri(store.uri)
    store.experiment(NAME)
    with tracking.start_run(NAME, "serving-model") as run:
        model_uri = tracking.log_model(
            run,
            result.model.state_dict(),
            architecture_of(config),
            example_pixels=to_pixels(splits.test.images[:1]).reshape(1, -1),
        )
    version = registry.register_version(model_uri, MODEL, run.run_id, {})
    if version != "1":
        raise RuntimeError(f"expected version 1 of {MODEL}, got {version}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MLFLOW_SERVE = "mlflow models serve"
GUARDED_SERVE = "mnist-track serve"


class Server:
    """`mlflow models serve` (or `mnist-track serve`) in its own process group, stopped
    (group and all) on exit."""

    def __init__(self, store, log_path: Path, command: str = MLFLOW_SERVE) -> None:
        self.port = free_port()
        self.command = command
        env = dict(os.environ)
        env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"  # uvicorn is run from PATH
        env["MLFLOW_TRACKING_URI"] = store.uri
        self.log_file = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        if command == MLFLOW_SERVE:
            arguments = ["mlflow", "models", "serve", "-m", f"models:/{MODEL}/1"]
            arguments += ["--env-manager", "local"]
        else:
            arguments = ["mnist-track", "serve", f"models:/{MODEL}/1"]
        arguments[0] = str(BIN_DIR / arguments[0])
        self.process = subprocess.Popen(
            [*arguments, "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            cwd=store.folder,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log_path = log_path

    def wait_ready(self) -> float:
        started = time.perf_counter()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2).close()
                return time.perf_counter() - started
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.command} did not answer /ping in {START_TIMEOUT} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # the group this class started
                self.process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log_file.close()


class Client:
    """One keep-alive HTTP connection to /invocations."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, body: bytes) -> bytes:
        self.connection.request(
            "POST", "/invocations", body=body, headers={"Content-Type": "application/json"}
        )
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self.connection.close()


def json_body(images) -> bytes:
    return json.dumps({"inputs": images.reshape(len(images), 784).tolist()}).encode()


def compact_body(images) -> bytes:
    encoded = [base64.b64encode(image.tobytes()).decode() for image in images]
    return json.dumps({"inputs": encoded}).encode()


def check_answer(client: Client, body: bytes, labels) -> None:
    """The server really classifies these images (not just answers 200)."""
    predictions = json.loads(client.post(body))["predictions"]
    digits = [row["digit"] for row in predictions]
    if len(digits) != len(labels):
        raise RuntimeError(f"expected {len(labels)} predictions, got {len(digits)}")
    correct = sum(int(d) == int(t) for d, t in zip(digits, labels, strict=True))
    if correct < 0.8 * len(labels):
        raise RuntimeError(f"only {correct}/{len(labels)} served predictions are right")


def latencies(client: Client, bodies: list[bytes], count: int) -> list[float]:
    for body in bodies[:10]:
        client.post(body)  # warm-up
    times = []
    for index in range(count):
        body = bodies[index % len(bodies)]
        started = time.perf_counter()
        client.post(body)
        times.append(time.perf_counter() - started)
    return times


def throughput(port: int, bodies: list[bytes], clients: int, requests_each: int) -> float:
    """Images/s for `clients` threads each sending `requests_each` batches."""
    connections = [Client(port) for _ in range(clients)]
    for connection in connections:
        connection.post(bodies[0])  # open and warm each connection
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def work(connection: Client, offset: int) -> None:
        barrier.wait()
        try:
            for index in range(requests_each):
                connection.post(bodies[(offset + index) % len(bodies)])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [
        threading.Thread(target=work, args=(connection, offset))
        for offset, connection in enumerate(connections)
    ]
    seconds = released_together(threads, barrier)
    for connection in connections:
        connection.close()
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]}")
    return clients * requests_each * BATCH / seconds


def in_process(uri: str, singles: dict, batches: dict, repeats: int) -> dict:
    """The same inputs through the pyfunc model loaded in this process (no HTTP, no
    JSON): median seconds per single-image predict and per batch predict, per format."""
    from mnist_track import tracking

    model = tracking.load_model(uri)
    seconds = {}
    for name in singles:
        for kind, inputs in (("single", singles[name]), ("batch", batches[name])):
            model.predict(inputs)  # warm-up
            seconds[name, kind] = statistics.median(
                timed(lambda inputs=inputs: model.predict(inputs))[0] for _ in range(repeats)
            )
    return seconds


def model_inputs(images) -> dict:
    """What a Python caller hands predict(): pixel rows, or base64 strings."""
    return {
        "JSON array": images.reshape(len(images), 784),
        "compact base64": np.array(
            [base64.b64encode(image.tobytes()).decode() for image in images], dtype=object
        ),
    }


def run(context: Context) -> list[Figure]:
    quick = context.quick
    single_count = 100 if quick else 500
    batch_requests = 6 if quick else 25  # per client
    images, labels = context.raw.test_images, context.raw.test_labels
    singles = {
        "JSON array": [json_body(images[i : i + 1]) for i in range(32)],
        "compact base64": [compact_body(images[i : i + 1]) for i in range(32)],
    }
    batches = {
        "JSON array": [json_body(images[i * BATCH : (i + 1) * BATCH]) for i in range(4)],
        "compact base64": [compact_body(images[i * BATCH : (i + 1) * BATCH]) for i in range(4)],
    }
    figures: list[Figure] = []
    with temp_store("bench-serving-") as store:
        log("serving: training and registering a small model")
        register_small_model(context, store)
        log("serving: in-process pyfunc reference")
        local = in_process(
            f"models:/{MODEL}/1",
            model_inputs(images[:1]),
            model_inputs(images[:BATCH]),
            repeats=20 if quick else 100,
        )
        server = Server(store, store.folder / "serve.log")
        try:
            log("serving: starting mlflow models serve")
            ready = server.wait_ready()
            client = Client(server.port)
            for body in (batches["JSON array"][0], batches["compact base64"][0]):
                check_answer(client, body, labels[:BATCH])
            for name, bodies in singles.items():
                log(f"serving: single-image latency, {name}")
                times = latencies(client, bodies, single_count)
                figures += latency_figures(name, times, local[name, "single"], quick)
            client.close()
            for name, bodies in batches.items():
                rates = {}
                for clients in (1, 4):
                    log(f"serving: batches of {BATCH}, {name}, {clients} client(s)")
                    rates[clients] = throughput(server.port, bodies, clients, batch_requests)
                figures += throughput_figures(
                    name, rates, BATCH / local[name, "batch"], batch_requests, bodies, quick
                )
            log(f"serving: caps, {BURST} concurrent worst-case requests")
            figures += caps_figures(server, images[0], quick)
        finally:
            log("serving: stopping the server")
            server.stop()
        figures += guarded_figures(store, images[0], labels[:BATCH], batches, quick)
    workers = os.environ.get("MLFLOW_MODELS_WORKERS", "1 (MLflow's default)")
    figures.append(
        Figure(
            NAME,
            "mlflow models serve: start to /ping",
            ready,
            "s",
            estimate=quick,
            note=f"uvicorn workers: {workers}; model {MODEL}/1 from the SQLite registry",
        )
    )
    return figures


def latency_figures(name: str, times: list[float], local: float, quick: bool) -> list[Figure]:
    reference = "in-process pyfunc predict, 1 image (median)"
    note = f"{len(times)} sequential requests on one keep-alive connection after 10 warm-up ones"
    figures = []
    for q, target in ((50, ("value", "<=", 5)), (99, None)):
        value = percentile(times, q) * 1000
        figures.append(
            Figure(
                NAME,
                f"single image, {name}: p{q} latency",
                value,
                "ms",
                reference=reference,
                reference_value=local * 1000,
                reference_unit="ms",
                ratio=value / (local * 1000),
                ratio_of="HTTP / in-process",
                target=target,
                estimate=quick,
                note=note,
            )
        )
    return figures


def throughput_figures(
    name: str, rates: dict, local_rate: float, requests: int, bodies: list[bytes], quick: bool
) -> list[Figure]:
    note = (
        f"{requests} requests of {BATCH} images per client (threads, one keep-alive "
        f"connection each); body {len(bodies[0]) / 1024:.0f} KiB"
    )
    target = ("value", ">=", 5000) if name == "compact base64" else None
    return [
        Figure(
            NAME,
            f"batch {BATCH}, {name}, 1 client",
            rates[1],
            "images/s",
            reference=f"in-process pyfunc predict, {BATCH} images",
            reference_value=local_rate,
            reference_unit="images/s",
            ratio=rates[1] / local_rate,
            ratio_of="HTTP / in-process",
            target=target,
            estimate=quick,
            note=note,
        ),
        Figure(
            NAME,
            f"batch {BATCH}, {name}, 4 clients",
            rates[4],
            "images/s",
            reference="1 client",
            reference_value=rates[1],
            reference_unit="images/s",
            ratio=rates[4] / rates[1],
            ratio_of="4 clients / 1 client",
            target=target,
            estimate=quick,
            note=note,
        ),
    ]


# --- the input caps under load ---------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encoded(image, kind: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def worst_files() -> dict[str, bytes]:
    """Files at every per-file cap at once: MAX_IMAGE_PIXELS declared (1024x1024), exactly
    MAX_IMAGE_BYTES, and the costliest content found for each format: a 4-channel PNG
    with the spare bytes as thousands of empty chunks before its pixels (each parsed in
    Python), and a CMYK progressive JPEG with MAX_JPEG_SCANS scans, padded by comments."""
    from PIL import Image

    from mnist_track.serving import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_JPEG_SCANS

    side = int(MAX_IMAGE_PIXELS**0.5)
    png = encoded(Image.new("RGBA", (side, side)), "PNG")
    spare = MAX_IMAGE_BYTES - len(png)
    padding = png_chunk(b"zTXt", b"") * (spare // 12 - 1)
    padding += png_chunk(b"zTXt", bytes(spare - len(padding) - 12))
    png = png[:33] + padding + png[33:]  # after IHDR, before the pixels
    jpeg = encoded(Image.new("CMYK", (side, side)), "JPEG", progressive=True)
    start = jpeg.rfind(b"\xff\xda")
    scan = jpeg[start : start + 2 + struct.unpack(">H", jpeg[start + 2 : start + 4])[0]]
    end = jpeg.rfind(b"\xff\xd9")
    jpeg = jpeg[:end] + scan * (MAX_JPEG_SCANS - jpeg.count(b"\xff\xda")) + jpeg[end:]
    spare = MAX_IMAGE_BYTES - len(jpeg)  # one comment segment: up to 65,537 bytes
    jpeg = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", spare - 2) + bytes(spare - 4) + jpeg[2:]
    files = {"PNG": png, "JPEG": jpeg}
    for name, content in files.items():
        if len(content) != MAX_IMAGE_BYTES:
            raise RuntimeError(f"worst {name} is {len(content)} bytes, not {MAX_IMAGE_BYTES}")
    return files


def worst_body(digit) -> tuple[bytes, str]:
    """The largest request the caps allow: MAX_IMAGE_FILES copies of the slowest worst
    file (timed here) and raw pixels up to MAX_IMAGES; and which file it is."""
    from mnist_track.serving import MAX_IMAGE_FILES, MAX_IMAGES, image_file_to_pixels

    files = worst_files()
    cost = {
        name: statistics.median(
            timed(lambda content=content: image_file_to_pixels(content, "worst"))[0]
            for _ in range(5)
        )
        for name, content in files.items()
    }
    slowest = max(cost, key=cost.get)
    images = [base64.b64encode(files[slowest]).decode()] * MAX_IMAGE_FILES
    images += [base64.b64encode(digit.tobytes()).decode()] * (MAX_IMAGES - MAX_IMAGE_FILES)
    note = f"{slowest}, {cost[slowest] * 1000:.0f} ms in-process"
    return json.dumps({"inputs": images}).encode(), note


def process_tree(root: int) -> list[int]:
    """root and its descendants (the mlflow CLI and the uvicorn process it starts)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack += children.get(pid, [])
    return tree


def peak_rss(pids: list[int]) -> float:
    """The largest VmHWM (peak resident set) among the processes, in MiB."""
    peaks = [0.0]
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def reset_peak_rss(pids: list[int]) -> None:
    for pid in pids:  # "5" resets VmHWM to the current RSS (Linux 4.0+)
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def burst(port: int, body: bytes, clients: int) -> tuple[float, list[int]]:
    """Wall seconds for `clients` threads sending `body` once each, all at once (one new
    connection each), and the HTTP statuses."""
    barrier = threading.Barrier(clients + 1)
    statuses: list[int] = []

    def send() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        barrier.wait()
        try:
            connection.request(
                "POST", "/invocations", body=body, headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        except OSError:
            statuses.append(0)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(clients)]
    return released_together(threads, barrier), statuses


def bursts(server: Server, requests: dict[str, tuple[bytes, int]]) -> dict[str, tuple]:
    """Per named (body, expected status): BURST of it at once, (wall s, server peak RSS MiB,
    RSS before MiB), the peak reset before each burst."""
    pids = process_tree(server.process.pid)
    results = {}
    for name, (request, expected) in requests.items():
        reset_peak_rss(pids)
        baseline = peak_rss(pids)
        seconds, statuses = burst(server.port, request, BURST)
        if statuses != [expected] * BURST:
            raise RuntimeError(
                f"{server.command}, {name} burst: statuses {sorted(set(statuses))}, "
                f"not all {expected}"
            )
        results[name] = seconds, peak_rss(pids), baseline
    return results


def small_body(digit) -> bytes:
    return json.dumps({"inputs": [base64.b64encode(digit.tobytes()).decode()]}).encode()


def caps_figures(server: Server, digit, quick: bool) -> list[Figure]:
    """BURST concurrent requests of the worst input the caps allow against BURST of one
    small image: wall time and the server's peak RSS (VmHWM, reset before each burst)."""
    from mnist_track.serving import MAX_IMAGE_FILES, MAX_IMAGES

    body, worst = worst_body(digit)
    results = bursts(server, {"small": (small_body(digit), 200), "worst": (body, 200)})
    note = (
        f"{BURST} requests at once, one connection each; worst request: {len(body) / 1e6:.1f} MB, "
        f"{MAX_IMAGE_FILES} files at every per-file cap ({worst}) and raw images up to "
        f"{MAX_IMAGES:,}; RSS before: {results['small'][2]:.0f} MiB"
    )
    # README: at most ~16 MiB per worst request in flight (its body, parsed, its pixels,
    # and one file decoded at a time). All answered within MLflow's request timeout (60 s).
    return burst_figures(
        MLFLOW_SERVE, "worst-case", results["worst"], results["small"], note, quick
    )


def burst_figures(
    command: str, what: str, result: tuple, small: tuple, note: str, quick: bool
) -> list[Figure]:
    """Wall time and peak RSS of BURST concurrent requests against BURST 1-image ones."""
    (seconds, peak, _), (small_s, small_peak, _) = result, small
    prefix = "caps" if command == MLFLOW_SERVE else GUARDED_SERVE
    reference = f"{BURST} concurrent 1-image requests"
    common = dict(reference=reference, ratio_of="worst / small", estimate=quick, note=note)
    return [
        Figure(
            NAME,
            f"{prefix}: {BURST} concurrent {what} requests, wall time",
            seconds,
            "s",
            reference_value=small_s,
            reference_unit="s",
            ratio=seconds / small_s,
            target=("value", "<", 60),
            **common,
        ),
        Figure(
            NAME,
            f"{prefix}: {BURST} concurrent {what} requests, server peak RSS",
            peak,
            "MiB",
            reference_value=small_peak,
            reference_unit="MiB",
            ratio=peak / small_peak,
            target=("value", "<=", small_peak + 16 * BURST),
            **common,
        ),
    ]


def largest_guarded_body(digit) -> bytes:
    """The largest mixed request mnist-track serve accepts: MAX_IMAGE_FILES files at the
    byte cap and raw images up to the guard's bound on MLflow's padded strings."""
    from mnist_track.serving import MAX_IMAGE_FILES
    from mnist_track.serving_guard import MAX_PARSED_BYTES

    png = base64.b64encode(worst_files()["PNG"]).decode()
    count = MAX_PARSED_BYTES // (4 * len(png))
    raw = base64.b64encode(digit.tobytes()).decode()
    images = [png] * MAX_IMAGE_FILES + [raw] * (count - MAX_IMAGE_FILES)
    return json.dumps({"inputs": images}).encode()


def guarded_figures(store, digit, labels, batches: dict, quick: bool) -> list[Figure]:
    """`mnist-track serve`: the caps' worst request (refused before MLflow parses it) and
    the largest mixed one it accepts, BURST at once each, against BURST 1-image ones."""
    from mnist_track.serving import MAX_IMAGE_FILES

    server = Server(store, store.folder / "guarded.log", GUARDED_SERVE)
    try:
        log("serving: starting mnist-track serve")
        server.wait_ready()
        client = Client(server.port)
        check_answer(client, batches["compact base64"][0], labels)
        client.close()
        worst, _ = worst_body(digit)
        largest = largest_guarded_body(digit)
        log(f"serving: mnist-track serve, {BURST} concurrent worst-case requests")
        results = bursts(
            server,
            {"small": (small_body(digit), 200), "worst": (worst, 400), "largest": (largest, 200)},
        )
    finally:
        server.stop()
    base = results["small"][2]
    worst_note = (
        f"{BURST} requests at once; the caps' worst request ({len(worst) / 1e6:.1f} MB), "
        f"refused with 400 before MLflow parses it; RSS before: {base:.0f} MiB"
    )
    largest_note = (
        f"{BURST} requests at once; {len(json.loads(largest)['inputs'])} images "
        f"({len(largest) / 1e6:.1f} MB): {MAX_IMAGE_FILES} PNGs at every per-file cap and raw "
        "images, as many as the guard's bound on MLflow's padded strings allows; "
        f"RSS before: {base:.0f} MiB"
    )
    return burst_figures(
        GUARDED_SERVE, "worst-case", results["worst"], results["small"], worst_note, quick
    ) + burst_figures(
        GUARDED_SERVE, "largest accepted", results["largest"], results["small"], largest_note, quick
    )


def released_together(threads: list[threading.Thread], barrier: threading.Barrier) -> float:
    """Start `threads`, release them at once through `barrier` (whose last party is this
    thread), and return the seconds until all have finished."""
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started
