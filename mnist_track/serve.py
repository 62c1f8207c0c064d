"""`mnist-track serve`: MLflow's own scoring app for a model, behind `RequestGuard`, run
by uvicorn. The protocol (/invocations, /ping, /health, /version, the JSON and CSV
formats, the request timeout) is MLflow's; only the guard is ours."""

from __future__ import annotations

import os
import signal
import tempfile

# Where the workers find the model: uvicorn starts each from an import string, so the
# local copy's path travels in the environment (as MLflow's own app.py does it).
MODEL_PATH_ENV = "MNIST_TRACK_SERVE_MODEL_PATH"
APP_FACTORY = "mnist_track.serve:app_from_environment"


def app_from_environment():
    """The guarded scoring app of the model at $MNIST_TRACK_SERVE_MODEL_PATH."""
    from mlflow.pyfunc import scoring_server

    from mnist_track.serving_guard import RequestGuard

    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_PATH_ENV])
    return RequestGuard(scoring_server.init(model))


def serve(model_uri: str, host: str, port: int, workers: int) -> None:
    """Download the model once (an alias is resolved once, so every worker serves the
    same version) and serve it until interrupted."""
    import uvicorn
    from mlflow.artifacts import download_artifacts

    # SIGTERM is how services are stopped: a clean stop, exit 0. uvicorn's single-process
    # server shuts down, then raises the signal again with the handler it found; left at
    # the default, that would kill the process before the model's copy is removed.
    signal.signal(signal.SIGTERM, _stop)
    with tempfile.TemporaryDirectory(prefix="mnist-track-serve-") as folder:
        os.environ[MODEL_PATH_ENV] = download_artifacts(artifact_uri=model_uri, dst_path=folder)
        uvicorn.run(APP_FACTORY, factory=True, host=host, port=port, workers=workers)


def _stop(signum, frame) -> None:
    raise SystemExit(0)
