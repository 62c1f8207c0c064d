"""A real `mlflow server` on 127.0.0.1 for end-to-end tests of workers that share it.

This module owns the tracking server's life in a test session and the environment a worker
process gets:

- `tracking_server` (session fixture): creates two fresh databases on the `postgres_url`
  server (postgres.py), one for MLflow's backend store and one for Optuna studies, starts
  `mlflow server` on a free port of 127.0.0.1 with that backend store and proxied
  artifacts in a temporary folder, waits for `/health`, yields a `TrackingServer` and at
  the end stops the server's whole process group and removes the folder.
- `worker_env(server, **extra)`: the environment of a worker "on another machine": only
  PATH, HOME, the locale, the MNIST files, MLFLOW_TRACKING_URI and MNIST_TRACK_STORAGE.
- `start_worker(server, folder, *args, name=...)` runs `mnist-track tune ARGS
  --no-download` in `folder` with that environment, its output in `folder/<name>.out` and
  `.err`; `output_of(folder, name)` reads both back.

Startup, measured on 2 CPU cores with PostgreSQL already running: 5.3-5.8 s from spawning
`mlflow server` to the first 200 from /health on a fresh database (4.6-4.8 s on one
already migrated, so about 1 s is creating MLflow's tables); most of the rest is Python
importing MLflow twice, in the `mlflow` CLI and in the uvicorn process it starts (importing
`mlflow.server.fastapi_app` alone takes about 3 s). Stopping takes about 1 s. The fixture
appends its own measurement to the end of the server's log.

Use it from a test module with `pytest_plugins = ["postgres", "tracking_server"]`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BIN_DIR, mnist_dir
from postgres import create_database, free_port

HOST = "127.0.0.1"
BACKEND_DATABASE = "mlflow_backend"
STUDIES_DATABASE = "optuna_studies"
# MLflow retries an unreachable database for about 100 s before it exits: wait longer, so
# that a broken backend fails with its own error in the log rather than our timeout.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 3
# Nothing in these tests may reach beyond 127.0.0.1. Telemetry is off for the server and
# for workers too: their stripped environment lacks PYTEST_CURRENT_TEST, which is what
# otherwise keeps MLflow's telemetry quiet under pytest.
OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@dataclass(frozen=True)
class TrackingServer:
    """A running tracking server: its URL, the Optuna storage beside it, where its
    artifacts land, its log, and the HOME that `worker_env` gives workers."""

    url: str
    storage_url: str
    artifacts: Path
    log: Path
    home: Path | None = None


# --- the server -------------------------------------------------------------------------


def server_command(backend_url: str, artifacts: Path, port: int) -> list[str]:
    return [
        str(BIN_DIR / "mlflow"), "server",
        "--backend-store-uri", backend_url,
        # Proxied artifacts: clients get mlflow-artifacts:/ URIs and upload through the
        # server, so a worker needs no access to this folder.
        "--serve-artifacts",
        "--artifacts-destination", str(artifacts),
        "--host", HOST,
        "--port", str(port),
        "--workers", "1",
        # The default allowed hosts already accept 127.0.0.1:*; naming this one port only
        # makes the server refuse Host headers the tests never send.
        "--allowed-hosts", f"{HOST}:{port},{HOST}",
    ]  # fmt: skip


def server_env(home: Path) -> dict[str, str]:
    env = {
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        # Scheduled jobs (GenAI scorers, trace rollups) would start a job runner; these
        # tests need none of it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **OFFLINE,
    }
    env.update(locale())
    return env


def locale() -> dict[str, str]:
    return {key: os.environ[key] for key in ("LANG", "LC_ALL") if os.environ.get(key)}


def spawn(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """The server in its own process group: `mlflow server` runs uvicorn as a child, and
    teardown must stop both, whichever ignores SIGTERM."""
    with open(log, "ab") as output:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class ServerDied(RuntimeError):
    """`mlflow server` exited before it answered /health."""


def healthy(url: str) -> bool:
    # No proxies: a proxy from the environment must not see (or swallow) loopback calls.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_until_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    """Returns once /health answers 200; raises if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if process.poll() is not None:
            raise ServerDied(f"mlflow server exited {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server did not answer {url}/health in {timeout:.0f} s")
        time.sleep(0.25)


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to the whole group (mlflow forwards it to uvicorn), SIGKILL after `timeout`
    seconds, and SIGKILL to any child that outlived the leader."""
    signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in the kernel: give up
            process.wait(timeout=timeout)
    signal_group(process, signal.SIGKILL)


def signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(process.pid, sig)  # the leader's pid is the group's id


def tail(path: Path, size: int = 4000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"


def port_was_taken(log: Path) -> bool:
    # The free port can be grabbed by someone else before uvicorn binds it.
    return "address already in use" in tail(log).lower()


def start_server(
    backend_url: str, root: Path, command: Callable[[str, Path, int], list[str]] = server_command
) -> tuple[subprocess.Popen, str]:
    """`mlflow server` (or another `command(backend_url, artifacts, port)`) with its
    artifacts in root/artifacts and its cwd in root/cwd (so any file it drops lands there),
    retried on another port if the first was taken meanwhile; returns the process and its
    URL."""
    log = root / "server.log"
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        url = f"http://{HOST}:{port}"
        argv = command(backend_url, root / "artifacts", port)
        process = spawn(argv, server_env(home=root / "cwd"), root / "cwd", log)
        try:
            wait_until_healthy(process, url, START_TIMEOUT)
        except ServerDied:
            stop(process)
            if attempt < PORT_ATTEMPTS and port_was_taken(log):
                continue
            raise
        except BaseException:
            stop(process)
            raise
        return process, url
    raise AssertionError("unreachable")


@contextmanager
def running_tracking_server(postgres_url: str) -> Iterator[TrackingServer]:
    """An `mlflow server` on 127.0.0.1 with a PostgreSQL backend store and proxied
    artifacts, and an empty Optuna database on the same PostgreSQL server; stopped and
    its folder removed at the end. Raises ServerDied or TimeoutError (with the end of its
    log) when it does not come up."""
    backend_url = create_database(postgres_url, BACKEND_DATABASE)
    storage_url = create_database(postgres_url, STUDIES_DATABASE)
    root = Path(tempfile.mkdtemp(prefix="mnist-track-mlflow-", dir="/tmp"))
    for folder in ("artifacts", "home", "cwd"):
        (root / folder).mkdir()
    artifacts, log = root / "artifacts", root / "server.log"
    started = time.monotonic()
    try:
        process, url = start_server(backend_url, root)
    except (ServerDied, TimeoutError) as error:
        end_of_log = tail(log)
        shutil.rmtree(root, ignore_errors=True)
        raise type(error)(f"{error}; end of its log:\n{end_of_log}") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    with open(log, "a") as output:
        output.write(f"\n# mnist-track tests: healthy after {time.monotonic() - started:.1f} s\n")
    try:
        yield TrackingServer(url, storage_url, artifacts, log, home=root / "home")
    finally:
        stop(process)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(postgres_url: str) -> Iterator[TrackingServer]:
    """`running_tracking_server` for the whole test session."""
    server = running_tracking_server(postgres_url)
    try:
        running = server.__enter__()
    except (ServerDied, TimeoutError) as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield running
    finally:
        server.__exit__(None, None, None)


# --- workers ----------------------------------------------------------------------------


def worker_env(server: TrackingServer, **extra: str) -> dict[str, str]:
    """Only what a worker on another machine would have (nothing inherited from this
    process, so no stray MLFLOW_* or credentials), plus `extra`."""
    env = {
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(server.home or tempfile.gettempdir()),
        **locale(),
        "MNIST_TRACK_DATA": str(mnist_dir()),
        "MLFLOW_TRACKING_URI": server.url,
        "MNIST_TRACK_STORAGE": server.storage_url,
        **OFFLINE,
    }
    env.update(extra)
    return env


def start_worker(
    server: TrackingServer,
    folder: Path,
    *args: str,
    name: str,
    env_extra: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`mnist-track tune ARGS --no-download` in the background in `folder`, its output in
    files there (pipes could fill up while nobody reads them)."""
    with open(folder / f"{name}.out", "w") as stdout, open(folder / f"{name}.err", "w") as stderr:
        return subprocess.Popen(
            [str(BIN_DIR / "mnist-track"), "tune", *args, "--no-download"],
            cwd=folder,
            env=worker_env(server, **(env_extra or {})),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            text=True,
        )


def output_of(folder: Path, name: str = "tune") -> str:
    """A worker's stdout, then its stderr."""
    return (folder / f"{name}.out").read_text() + (folder / f"{name}.err").read_text()
