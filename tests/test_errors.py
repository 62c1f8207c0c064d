"""Unit tests for mnist_track.errors: one base class for the package's expected errors, and
the one place where the stores' errors become one-line messages with secrets masked."""

from __future__ import annotations

import pytest

from mnist_track.config import ConfigError
from mnist_track.coordination import LockTimeout
from mnist_track.data import DataError
from mnist_track.errors import MnistTrackError, expected_message, one_line
from mnist_track.tracking import TrackingError
from mnist_track.train import TrainingDiverged
from mnist_track.tune import StudyError

SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(
    "error_class",
    [ConfigError, DataError, TrackingError, StudyError, LockTimeout, TrainingDiverged],
)
def test_every_domain_error_is_a_mnist_track_error(error_class):
    assert issubclass(error_class, MnistTrackError)
    assert expected_message(error_class("what went wrong")) == "what went wrong"


def store_errors() -> dict[str, BaseException]:
    import optuna
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException, RestException

    url = f"postgresql://alice:{SECRET}@db.example/optuna?password={SECRET}"
    return {
        "mlflow": MlflowException(f"Registered Model with name=x not found at {url}"),
        "rest": RestException(
            {"error_code": "PERMISSION_DENIED", "message": f"no access to {url}"}
        ),
        "optuna": optuna.exceptions.DuplicatedStudyError(f"study exists in {url}"),
        "sqlalchemy": sqlalchemy.exc.OperationalError(
            "SELECT 1", {}, Exception(f"could not connect to {url}\n\tIs the server running?")
        ),
        "os": PermissionError(13, "Permission denied", "/srv/mlruns"),
    }


@pytest.mark.parametrize("name", ["mlflow", "rest", "optuna", "sqlalchemy", "os"])
def test_store_errors_are_expected_as_one_masked_line(name):
    message = expected_message(store_errors()[name])
    assert message is not None
    assert "\n" not in message
    assert SECRET not in message
    assert "alice:***@" in message or name == "os"


def test_an_os_error_names_its_file():
    assert expected_message(store_errors()["os"]) == "/srv/mlruns: Permission denied"


def test_a_rest_error_keeps_its_code():
    message = expected_message(store_errors()["rest"])
    assert message.startswith("MLflow: PERMISSION_DENIED: no access to")


def test_a_driver_error_loses_its_sql_and_background_lines():
    message = expected_message(store_errors()["sqlalchemy"])
    assert message.startswith("database: (builtins.Exception) could not connect to")
    assert "Is the server running?" in message
    assert "SELECT 1" not in message and "sqlalche.me" not in message


@pytest.mark.parametrize("error", [KeyError("x"), TypeError("bug"), AssertionError()])
def test_a_bug_is_not_expected(error):
    assert expected_message(error) is None


def test_one_line_joins_lines_and_caps_the_length():
    assert one_line("first\n  second\n\n") == "first second"
    assert len(one_line("x" * 5000)) == 1000
