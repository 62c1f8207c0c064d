"""The only module that talks to MLflow: runs, params, metrics, figures, the model, the
Model Registry and its aliases.

Run lifecycle goes through MLflow's fluent API (model logging needs an active run);
everything else goes through `MlflowClient` with explicit run ids, batched into as few
calls as possible.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

# Artifact transfers are local and fast; their progress bars only clutter the output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CHAMPION_ALIAS = "champion"
LAUNCHER_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the entry point's process
MODEL_NAME_IN_RUN = "model"
PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE_DIR / "model_code.py"
ERROR_TAG = "error"
VALIDATION_ACCURACY_TAG = "validation_accuracy"


class TrackingError(RuntimeError):
    """The tracking store or registry cannot do what was asked."""


def use_tracking_uri(uri: str | None) -> str:
    """Point MLflow at `uri` (else $MLFLOW_TRACKING_URI, else MLflow's default) and
    check the store answers, so a bad URI fails before any training."""
    if uri:
        mlflow.set_tracking_uri(uri)
    resolved = mlflow.get_tracking_uri()
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any store failure is reported the same way
        raise TrackingError(
            f"cannot open the MLflow tracking store {resolved!r}: {error}"
        ) from None
    return resolved


@dataclass
class RunLog:
    """Logging into one run by id; cheap to create, safe to use from any thread."""

    run_id: str
    client: MlflowClient
    # A run started by `mlflow run` already holds the MLproject parameters (MLflow refuses
    # to change a param): those keep the launcher's values.
    adopted: bool = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        if self.adopted:
            existing = self.client.get_run(self.run_id).data.params
            items = [item for item in items if item.key not in existing]
        for start in range(0, len(items), 100):  # MLflow's per-batch limit for params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """All metrics in one call (one store transaction), stamped with one time."""
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow's per-batch limit for metrics
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_pngs(self, pngs: Mapping[str, bytes], artifact_path: str) -> None:
        """Several images in one artifact upload."""
        with tempfile.TemporaryDirectory() as folder:
            for name, content in pngs.items():
                (Path(folder) / name).write_bytes(content)
            self.client.log_artifacts(self.run_id, folder, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    killed_on: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
) -> Iterator[RunLog]:
    """A run that ends FINISHED, KILLED (on `killed_on` exceptions, e.g. a pruned trial or
    Ctrl-C) or FAILED with the error recorded as a tag and an artifact.

    `run_id` resumes a run; under `mlflow run` the launcher's run ($MLFLOW_RUN_ID) is used
    for a top-level run, so the MLproject run and ours are one.
    """
    launcher_run = launcher_run_id()
    adopted = run_id is None and parent_run_id is None and launcher_run is not None
    if adopted:
        run_id = launcher_run
    # MLflow would also resume $MLFLOW_RUN_ID for the next run started without an id (a
    # trial): once the launcher's run is taken, it must not be taken again.
    os.environ.pop(LAUNCHER_RUN_ENV, None)
    experiment_id = None
    if parent_run_id is not None:  # a child lives in its parent's experiment
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    elif run_id is None:
        mlflow.set_experiment(experiment)
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=run_name if run_id is None else None,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
    )
    log = RunLog(active.info.run_id, MlflowClient(), adopted=adopted)
    if tags:
        log.set_tags(tags)
    try:
        yield log
    except killed_on:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as error:
        record_error(log, error)
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def record_error(log: RunLog, error: BaseException) -> None:
    """The error as a tag (short, shown in the UI) and the traceback as error.txt."""
    try:
        log.set_tags({ERROR_TAG: f"{type(error).__name__}: {error}"[:4000]})
        log.log_text("".join(traceback.format_exception(error)), "error.txt")
    except Exception:  # noqa: BLE001 - never hide the original error behind a logging one
        pass


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def run_log(run_id: str) -> RunLog:
    """Logging into an existing run that is not the active one."""
    return RunLog(run_id, MlflowClient(), adopted=run_id == launcher_run_id())


_launcher_run: list[str | None] = []


def launcher_run_id() -> str | None:
    """The run `mlflow run` started for this process, if any (read once: start_run removes
    the variable so that MLflow does not reuse it)."""
    if not _launcher_run:
        _launcher_run.append(os.environ.get(LAUNCHER_RUN_ENV))
    return _launcher_run[0]


def create_run(experiment: str, run_name: str, tags: Mapping[str, Any]) -> str:
    """A new RUNNING run that is not made active (the caller resumes it with start_run)."""
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    run = MlflowClient().create_run(
        experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}
    )
    return run.info.run_id


def running_runs_tagged(experiment: str, tags: Mapping[str, Any], since_ms: int) -> list[str]:
    """Ids of RUNNING runs with all `tags`, started since `since_ms`, oldest first."""
    found = MlflowClient().get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(
        [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        + ["attributes.status = 'RUNNING'", f"attributes.start_time >= {since_ms}"]
    )
    runs = MlflowClient().search_runs([found.experiment_id], query, max_results=100)
    return [
        run.info.run_id for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))
    ]


def discard_run(run_id: str) -> None:
    """End a run that is not wanted and delete it (MLflow keeps it, hidden, until gc)."""
    client = MlflowClient()
    client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags on any run, running or ended."""
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_stale_run(run_id: str, status: str = "FAILED", reason: str | None = None) -> bool:
    """End a run left RUNNING by a process that died; False if it already ended."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status != "RUNNING":
        return False
    if reason:
        client.set_tag(run_id, ERROR_TAG, reason)
    client.set_terminated(run_id, status=status)
    return True


# --- the model -------------------------------------------------------------------------


def pip_requirements() -> list[str]:
    """Explicit requirements (inferring them costs seconds per model): the packages the
    served model imports, pinned to the versions that trained it."""
    names = ["mlflow", "torch", "numpy", "pandas", "safetensors", "pillow"]
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in names]


def log_model(
    state_dict: Mapping[str, Any],
    architecture: Mapping[str, Any],
    example_pixels: np.ndarray,
    registered_model: str | None,
) -> str | None:
    """Log the network as an MLflow pyfunc model into the active run: weights as
    safetensors, architecture as JSON, code as code (models-from-code plus this package),
    so nothing is pickled. Returns the new registered version, if registered."""
    from safetensors.torch import save_file

    from mnist_track.serving import ARCHITECTURE_ARTIFACT, WEIGHTS_ARTIFACT, model_signature

    with tempfile.TemporaryDirectory() as folder:
        weights_path = Path(folder) / "model.safetensors"
        architecture_path = Path(folder) / "architecture.json"
        save_file(
            {key: value.detach().cpu().contiguous() for key, value in state_dict.items()},
            str(weights_path),
        )
        architecture_path.write_text(json.dumps(dict(architecture), indent=2))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(MODEL_CODE),
            artifacts={
                WEIGHTS_ARTIFACT: str(weights_path),
                ARCHITECTURE_ARTIFACT: str(architecture_path),
            },
            code_paths=[str(PACKAGE_DIR)],
            signature=model_signature(),
            input_example=example_pixels,
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model,
        )
    version = getattr(info, "registered_model_version", None)
    return str(version) if version is not None else None


# --- the registry ----------------------------------------------------------------------


def tag_model_version(name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def alias_version(name: str, alias: str = CHAMPION_ALIAS):
    """The ModelVersion carrying `alias`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, version: str, alias: str = CHAMPION_ALIAS) -> None:
    client = MlflowClient()
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise TrackingError(f"registered model {name!r} has no version {version}") from None
    client.set_registered_model_alias(name, alias, version)


def promote_if_better(name: str, version: str, validation_accuracy: float) -> bool:
    """Move `champion` to `version` only if it beats the current champion's validation
    accuracy (or there is none). Returns True if it moved."""
    current = alias_version(name)
    if current is not None:
        best = float(current.tags.get(VALIDATION_ACCURACY_TAG, "-inf"))
        if validation_accuracy <= best:
            return False
    set_alias(name, version)
    return True


def model_version_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION_ALIAS}"


def load_model(model_uri: str):
    """A logged model as a pyfunc model (weights and code, no pickle)."""
    return mlflow.pyfunc.load_model(model_uri)
