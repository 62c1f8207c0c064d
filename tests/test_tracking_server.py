"""Smoke test of tracking_server.py: one `mnist-track train` from an empty folder with only
a worker's environment, against the real `mlflow server` (PostgreSQL backend store,
proxied artifacts), checked through the server with `MlflowClient`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import BIN_DIR

if TYPE_CHECKING:
    from tracking_server import TrackingServer

pytest_plugins = ["postgres", "tracking_server"]
pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

EXPERIMENT = "srv"
MODEL = "srv-model"
TRAIN = (
    "--epochs", "1", "--train-limit", "500", "--val-size", "200", "--test-limit", "200",
    "--hidden-sizes", "16", "--no-download",
    "--experiment", EXPERIMENT, "--registered-model", MODEL,
)  # fmt: skip


def train(server: TrackingServer, folder: Path) -> subprocess.CompletedProcess:
    # Imported here, not at the top: pytest_plugins loads tracking_server (and postgres)
    # after this module is imported, and a module imported before then is not
    # assertion-rewritten (PytestAssertRewriteWarning).
    from tracking_server import worker_env

    return subprocess.run(
        [str(BIN_DIR / "mnist-track"), "train", *TRAIN],
        cwd=folder,
        env=worker_env(server),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_worker_trains_and_registers_through_the_server(tracking_server, tmp_path, capsys):
    from mlflow import MlflowClient

    folder = tmp_path / "worker"
    folder.mkdir()
    result = train(tracking_server, folder)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    client = MlflowClient(tracking_uri=tracking_server.url, registry_uri=tracking_server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    # Proxied: the worker was told to upload through the server, not to a path of its own.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]
    run = runs[0]
    assert run.data.metrics

    plots = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "plots")]
    assert plots
    # ...and landed where the server keeps them: mlflow-artifacts:/<path> is
    # --artifacts-destination/<path>.
    stored = tracking_server.artifacts / run.info.artifact_uri.split(":", 1)[1].lstrip("/")
    assert all((stored / plot).is_file() for plot in plots), sorted(stored.rglob("*"))

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == run.info.run_id

    # For the record (printed even without -s): what the CLI left in its working folder. Nothing, so
    # far; a local store there (mlruns/, mlflow.db, optuna.db) would mean a worker wrote
    # beside the server instead of to it.
    created = files_in(folder)
    with capsys.disabled():
        print(f"\nfiles created in the worker's empty folder: {created}")
    assert created == []
