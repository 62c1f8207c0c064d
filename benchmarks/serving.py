"""A real `mlflow models serve` process over loopback HTTP: latency of single-image
requests and images/s of 256-image batches, for plain JSON arrays and for the compact
base64 format, with 1 and 4 concurrent clients (threads, one keep-alive connection each)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common import BIN_DIR, Context, Figure, log, percentile, temp_store, timed

NAME = "serving"
MODEL = "bench-serving"
BATCH = 256
START_TIMEOUT = 180


def register_small_model(context: Context, store) -> None:
    """A classic MLP trained one epoch on 10,000 images, logged and registered (version 1)
    with the functions train_and_track uses (no plots: they do not change the model)."""
    from mnist_track import tracking
    from mnist_track.config import TrainConfig
    from mnist_track.models import architecture_of
    from mnist_track.runs import to_pixels
    from mnist_track.train import fit

    config = TrainConfig(epochs=1, train_limit=10_000)
    splits = context.splits(train_limit=10_000, test_limit=1000)
    result = fit(config, splits)
    tracking.use_tracking_uri(store.uri)
    store.experiment(NAME)
    with tracking.start_run(NAME, "serving-model") as run:
        model_uri = tracking.log_model(
            result.model.state_dict(),
            architecture_of(config),
            example_pixels=to_pixels(splits.test.images[:1]).reshape(1, -1),
        )
    version = tracking.register_version(model_uri, MODEL, run.run_id, {})
    if version != "1":
        raise RuntimeError(f"expected version 1 of {MODEL}, got {version}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow models serve` in its own process group, stopped (group and all) on exit."""

    def __init__(self, store, log_path: Path) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"  # uvicorn is run from PATH
        env["MLFLOW_TRACKING_URI"] = store.uri
        self.log_file = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                str(BIN_DIR / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{MODEL}/1",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
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
                raise RuntimeError(
                    f"mlflow models serve exited:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2).close()
                return time.perf_counter() - started
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow models serve did not answer /ping in {START_TIMEOUT} s")

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
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
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
        finally:
            log("serving: stopping the server")
            server.stop()
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
