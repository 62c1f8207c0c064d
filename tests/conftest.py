"""Shared fixtures: the real MNIST files, small splits, and a throw-away MLflow store."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # the virtual environment's bin/: mnist-track, mlflow


def mnist_dir() -> Path:
    """$MNIST_TRACK_DATA, else the shared offline copy beside the repository."""
    return Path(os.environ.get("MNIST_TRACK_DATA") or REPO_ROOT.parent / "shared" / "mnist")


@pytest.fixture(scope="session", autouse=True)
def temp_files_kept_with_the_run(tmp_path_factory):
    """TMPDIR, for the tests and every process they start, is a folder of this run's
    (pytest keeps the last three runs): the processes the tests kill on purpose cannot
    remove their own temporary files, which would pile up in /tmp run after run."""
    import tempfile

    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
    patch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    yield
    patch.undo()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = mnist_dir()
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST files not found in {folder}: set MNIST_TRACK_DATA")
    return folder


@pytest.fixture(scope="session")
def raw_mnist(data_dir):
    from mnist_track.data import load_mnist

    return load_mnist(data_dir, download=False)


@pytest.fixture(scope="session")
def small_splits(raw_mnist):
    """2,000 training, 1,000 validation and 500 test images on the CPU."""
    import torch

    from mnist_track.data import make_splits

    return make_splits(
        raw_mnist,
        val_size=1000,
        split_seed=0,
        device=torch.device("cpu"),
        train_limit=2000,
        test_limit=500,
    )


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store in tmp_path (also the working directory), set for
    this process and for subprocesses."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables created once: creating them takes about
    a second, copying the file milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def migrated_store(tracking_uri, tmp_path, store_template) -> str:
    """`tracking_uri`, its database already created (copied from the template)."""
    import shutil

    shutil.copy(store_template, tmp_path / "mlflow.db")
    return tracking_uri


@pytest.fixture
def client(migrated_store):
    """An MlflowClient of the fresh store in tmp_path (copied from the migrated template)."""
    from mlflow import MlflowClient

    return MlflowClient()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for CLI subprocesses: the venv's bin first on PATH (mlflow models
    serve runs uvicorn from PATH), the MNIST files, and the current tracking URI."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env["MNIST_TRACK_DATA"] = str(mnist_dir())
    env.update(extra)
    return env


@pytest.fixture
def restored_signal_handlers():
    """The handlers of the signals `Interrupts` takes (train, tune and predict install it),
    put back after the test."""
    from mnist_track.interrupts import SIGNALS

    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def signals_as_from_a_terminal() -> None:
    """A child's `preexec_fn`: Ctrl-C and hangup at their defaults, as for a command typed
    in a terminal, even when this test run was started in the background or under nohup
    (which ignore them, and a child inherits that)."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def run_cli(*args: str, check: bool = True, timeout: float = 600, cwd=None, **env: str):
    """`mnist-track ARGS` as a subprocess; returns the CompletedProcess."""
    result = subprocess.run(
        [str(BIN_DIR / "mnist-track"), *args],
        capture_output=True,
        text=True,
        env=cli_env(**env),
        timeout=timeout,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"mnist-track {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def read_predictions(text: str) -> list[dict[str, str]]:
    """The CSV `mnist-track predict` writes (source, index, digit, p0..p9), a dict a row."""
    return list(csv.DictReader(io.StringIO(text)))


def confidence(row: dict[str, str]) -> float:
    """The probability of the predicted digit in a row of `read_predictions`."""
    return float(row[f"p{row['digit']}"])


# Fixture modules imported by test modules: their asserts explain themselves too.
pytest.register_assert_rewrite("browser", "postgres", "stores", "tracking_server")


@contextmanager
def in_sqlite_store(folder: Path):
    """MLflow pointed at a SQLite store in `folder` (also the working directory, where such
    a store keeps its artifacts, ./mlruns) for a module-scoped fixture, which cannot use
    monkeypatch; both are put back after. Yields the tracking URI."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous, cwd = mlflow.get_tracking_uri(), os.getcwd()
    mlflow.set_tracking_uri(uri)
    os.chdir(folder)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)
        os.chdir(cwd)
